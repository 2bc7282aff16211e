"""Keeps the kernel writing destination files out while a mirror copies into them.

Before a mirror job reports ``ready`` QEMU flushes the target, and guest writes wait for that
flush: in write-blocking mode each one is also written to the target, and (as we read qcow2's
cache code) the metadata flush can ``fdatasync`` the file while holding the image's lock. After an
unthrottled copy the page cache holds nearly everything copied: with 256 MiB the guest's writes
stalled about 115 ms here. Starting the write-out from outside while the copy runs leaves QEMU's
flush little to do (the same copy then stalled the guest 19-32 ms), and the copy finishes sooner:
the write-out overlaps the copy instead of following it.

How the write-out is started matters. Until 2026-11-27 each file was ``fdatasync``ed: every call
waited for all of the file's dirty pages and then for a device flush, and the next look at the
files waited for that call. Now each call is ``posix_fadvise(POSIX_FADV_DONTNEED)``, which on
Linux starts the write-out of the file's dirty pages without waiting for it (``WB_SYNC_NONE``) and
drops the file's pages that are already written. Those are of little use: the mirror never reads
DEST back, a DEST given O_DIRECT at the pivot is read past the page cache, and keeping every byte
of a large copy cached would push out what the host caches for its other guests. On libvirt's rig
the copy got faster too (README, Benchmarks). Nothing here makes anything durable: QEMU's flush
before ``ready`` does, and a ``finish`` fsyncs DEST itself.

A file is kicked only once it has grown by ``threshold`` since the last kick (``st_blocks``, cheap
to read), and the files are looked at about twice per ``threshold`` of growth, so a throttled copy
costs few wake-ups (each is about 0.2 ms of CPU).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

INTERVAL = 0.02  # seconds between looks at the files while they grow fast
MAX_INTERVAL = 0.5  # ... and when they grow slowly or not at all
THRESHOLD = 8 * 1024 * 1024  # bytes of growth that make a file's write-out worth starting


def start_writeback(path: str) -> None:
    """Start writing out ``path``'s dirty pages and drop its pages already written (Linux's
    POSIX_FADV_DONTNEED); returns without waiting for the write-out."""
    # Never through a symlink, never blocking on a FIFO swapped in for DEST.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def allocated_bytes(path: str) -> int | None:
    try:
        return os.lstat(path).st_blocks * 512
    except OSError:
        return None  # not there (yet), or not a local file: nothing to do


class Writeback:
    def __init__(self, paths: Iterable[str], *, interval: float = INTERVAL, max_interval: float = MAX_INTERVAL,
                 threshold: int = THRESHOLD, write_out: Callable[[str], None] = start_writeback) -> None:
        self.paths = tuple(paths)
        self.interval = interval
        self.max_interval = max_interval
        self.threshold = threshold
        self.write_out = write_out
        self._kicked_at: dict[str, int] = {}

    def sizes(self) -> dict[str, int]:
        """Allocated bytes of each file that is there (one ``stat`` each)."""
        return {path: size for path in self.paths if (size := allocated_bytes(path)) is not None}

    def due(self, sizes: dict[str, int]) -> list[str]:
        """The files of ``sizes`` that grew by ``threshold`` since blockcopy last started their write-out."""
        return [path for path, size in sizes.items() if size - self._kicked_at.get(path, 0) >= self.threshold]

    def next_interval(self, current: float, grown: int, elapsed: float) -> float:
        """Half the time the files take to grow by ``threshold`` at the rate just seen; when they
        did not grow, twice the last wait (the copy may be throttled, done, or between bursts)."""
        if grown <= 0 or elapsed <= 0:
            return min(self.max_interval, current * 2)
        return min(self.max_interval, max(self.interval, self.threshold / (grown / elapsed) / 2))

    async def run(self) -> None:
        """Until cancelled."""
        loop = asyncio.get_running_loop()
        interval, last_total, last_look = self.interval, None, loop.time()
        while True:
            sizes, now = await asyncio.to_thread(self.sizes), loop.time()  # (stat may hang on bad storage)
            total = sum(sizes.values())
            if last_total is not None:
                interval = self.next_interval(interval, total - last_total, now - last_look)
            last_total, last_look = total, now
            for path in self.due(sizes):
                try:
                    await asyncio.to_thread(self.write_out, path)
                except OSError as exc:  # an optimisation only; QEMU reports real I/O errors
                    log.info("writeback of %s: %s", path, exc)
                self._kicked_at[path] = sizes[path]
            await asyncio.sleep(interval)
