/*
 * blockcopy guest writer: writes self-describing blocks to raw virtio disks and reports each write
 * the kernel acknowledged on a serial port, so the host can prove that none was lost.
 *
 * Block layout (little endian), block size B (multiple of 512, default 4096):
 *   0  magic "BCWRITE1" (8 bytes)   8 run id (u32)   12 disk index (u32)
 *   16 sequence (u64)               24 offset (u64)  32 checksum (u32, FNV-1a of the block with
 *   this field zero)                36.. filler derived from the sequence
 * Slot k of disk d lives at base + k*B; writes go round robin over disks and slots, so a slot is
 * rewritten with a higher sequence every (disks*slots) writes.
 *
 * Ack lines on the ack device: "A <seq> <disk> <offset> <latency_us>\n", after pwrite() returned
 * (latency: the pwrite call, on the guest's monotonic clock). With -s the disk is opened O_SYNC
 * too, so an ack means "durable" (the virtio flush completed).
 * Start and end lines: "S <run> <disks> <slots> <block>\n", "P <writes>\n" before poweroff.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <time.h>
#include <unistd.h>

#define MAX_DISKS 8

static uint32_t fnv1a(const unsigned char *p, size_t n)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 16777619u;
    }
    return h;
}

static void put32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }

static void fill_block(unsigned char *buf, size_t block, uint32_t run, uint32_t disk, uint64_t seq,
                       uint64_t offset)
{
    memcpy(buf, "BCWRITE1", 8);
    put32(buf + 8, run);
    put32(buf + 12, disk);
    put64(buf + 16, seq);
    put64(buf + 24, offset);
    put32(buf + 32, 0);
    uint64_t x = seq * 6364136223846793005ull + 1442695040888963407ull;
    for (size_t i = 36; i < block; i++) {
        x ^= x >> 29;
        x *= 0xbf58476d1ce4e5b9ull;
        buf[i] = (unsigned char)(x >> 56);
    }
    put32(buf + 32, fnv1a(buf, block));
}

static void usage(void)
{
    fprintf(stderr, "usage: writer [-r run] [-b block] [-n slots] [-o base] [-i interval_us] "
                    "[-p poweroff_after] [-c count] [-s] [-a ackdev] disk...\n");
    exit(2);
}

int main(int argc, char **argv)
{
    uint32_t run = 1;
    size_t block = 4096;
    uint64_t slots = 1024, base = 0, interval_us = 0, poweroff_after = 0, count = 0;
    int sync_writes = 0;
    const char *ackdev = "/dev/ttyS1";
    int opt;
    while ((opt = getopt(argc, argv, "r:b:n:o:i:p:c:sa:")) != -1) {
        switch (opt) {
        case 'r': run = (uint32_t)strtoul(optarg, NULL, 0); break;
        case 'b': block = strtoul(optarg, NULL, 0); break;
        case 'n': slots = strtoull(optarg, NULL, 0); break;
        case 'o': base = strtoull(optarg, NULL, 0); break;
        case 'i': interval_us = strtoull(optarg, NULL, 0); break;
        case 'p': poweroff_after = strtoull(optarg, NULL, 0); break;
        case 'c': count = strtoull(optarg, NULL, 0); break;
        case 's': sync_writes = 1; break;
        case 'a': ackdev = optarg; break;
        default: usage();
        }
    }
    int ndisks = argc - optind;
    if (ndisks < 1 || ndisks > MAX_DISKS || block < 512 || block % 512 || slots == 0)
        usage();

    int fds[MAX_DISKS];
    for (int d = 0; d < ndisks; d++) {
        int flags = O_WRONLY | O_DIRECT | (sync_writes ? O_SYNC : 0);
        fds[d] = open(argv[optind + d], flags);
        if (fds[d] < 0) {
            perror(argv[optind + d]);
            return 1;
        }
    }
    FILE *ack = fopen(ackdev, "w");
    if (!ack) {
        perror(ackdev);
        return 1;
    }
    setvbuf(ack, NULL, _IOLBF, 0);
    unsigned char *buf;
    if (posix_memalign((void **)&buf, 4096, block)) {
        perror("posix_memalign");
        return 1;
    }
    fprintf(ack, "S %u %d %llu %zu\n", run, ndisks, (unsigned long long)slots, block);

    uint64_t seq = 0;
    for (;;) {
        seq++;
        uint32_t disk = (uint32_t)((seq - 1) % (uint64_t)ndisks);
        uint64_t slot = ((seq - 1) / (uint64_t)ndisks) % slots;
        uint64_t offset = base + slot * block;
        fill_block(buf, block, run, disk, seq, offset);
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        ssize_t n = pwrite(fds[disk], buf, block, (off_t)offset);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if (n != (ssize_t)block) {
            fprintf(ack, "E %llu %u %llu\n", (unsigned long long)seq, disk, (unsigned long long)offset);
            perror("pwrite");
            return 1;
        }
        long long lat_us = (long long)(t1.tv_sec - t0.tv_sec) * 1000000 + (t1.tv_nsec - t0.tv_nsec) / 1000;
        fprintf(ack, "A %llu %u %llu %lld\n", (unsigned long long)seq, disk, (unsigned long long)offset, lat_us);
        if (poweroff_after && seq >= poweroff_after) {
            fprintf(ack, "P %llu\n", (unsigned long long)seq);
            fflush(ack);
            fsync(fileno(ack));
            for (int d = 0; d < ndisks; d++)
                fsync(fds[d]);
            sync();
            reboot(RB_POWER_OFF);
            return 0;
        }
        if (count && seq >= count)
            break;
        if (interval_us) {
            struct timespec ts = {(time_t)(interval_us / 1000000), (long)(interval_us % 1000000) * 1000};
            nanosleep(&ts, NULL);
        }
    }
    fprintf(ack, "D %llu\n", (unsigned long long)seq);
    return 0;
}
