"""Host side of the guest: start it, follow its acknowledgements, verify images against them.

The guest reports every acknowledged write on its second serial port, which QEMU writes to a
file. :class:`AckLog` follows that file and stamps each line with the host's wall clock (the
guest's own clock stops while the VM is paused, so it cannot show the pause); the stamps are
comparable with QEMU's STOP/RESUME event times.
"""

from __future__ import annotations

import functools
import itertools
import os
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from blockcopy.guest.build import GuestImage, build
from blockcopy.images import image_opts
from blockcopy.vm import QEMU, DiskSpec, ScratchVM

BLOCK = 4096
MAGIC = b"BCWRITE1"


@dataclass(frozen=True)
class Ack:
    at: float  # host wall clock when the line was read
    seq: int
    disk: int
    offset: int
    latency_us: int | None = None  # how long the guest's pwrite() took


@dataclass
class AckLog:
    """Follows the ack file in a thread; ``acks`` grows while the guest writes."""

    path: Path
    poll: float = 0.002
    acks: list[Ack] = field(default_factory=list)
    started: bool = False
    powered_off_after: int | None = None
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True, name="ack-log")
        self._thread.start()

    def _follow(self) -> None:
        while not self.path.exists() and not self._stop.is_set():
            time.sleep(self.poll)
        with open(self.path, "rb") as log:
            pending = b""
            while True:
                chunk = log.read()
                if chunk:
                    now = time.time()
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        self._parse(line.strip().decode(errors="replace"), now)
                elif self._stop.is_set():
                    return
                else:
                    time.sleep(self.poll)

    def _parse(self, line: str, now: float) -> None:
        parts = line.split()
        if not parts:
            return
        if parts[0] == "A" and len(parts) in (4, 5):
            latency = int(parts[4]) if len(parts) == 5 else None
            self.acks.append(Ack(now, int(parts[1]), int(parts[2]), int(parts[3]), latency))
        elif parts[0] == "S":
            self.started = True
        elif parts[0] == "P":
            self.powered_off_after = int(parts[1])
        elif parts[0] == "E":
            self.errors.append(line)

    def count(self) -> int:
        return len(self.acks)

    def wait_for(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acks) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the guest acknowledged {len(self.acks)} writes, not {count}, in {timeout} s")
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def max_gap(self, start: float | None = None, end: float | None = None) -> float:
        """Largest time between consecutive acks whose window overlaps [start, end] (seconds)."""
        times = [a.at for a in self.acks]
        gaps = [(b - a) for a, b in itertools.pairwise(times)
                if (start is None or b >= start) and (end is None or a <= end)]
        return max(gaps, default=0.0)


class GuestVM(ScratchVM):
    """A ScratchVM that boots the writer guest on its disks."""

    def __init__(self, workdir: Path, disks: list[DiskSpec], *, accel: str, run_id: int = 1,
                 interval_us: int = 2000, slots: int = 1024, poweroff_after: int = 0, sync: bool = False,
                 image: GuestImage | None = None, name: str = "guest") -> None:
        image = image or build()
        args = [f"-r,{run_id}", f"-n,{slots}", f"-i,{interval_us}"]
        if poweroff_after:
            args.append(f"-p,{poweroff_after}")
        if sync:
            args.append("-s")
        self.ack_path = workdir / f"{name}.acks"
        self.console_path = workdir / f"{name}.console"
        self.run_id, self.slots = run_id, slots
        cmdline = (f"console=ttyS0 quiet panic=-1 bc.disks={','.join(d.id for d in disks)} "
                   f"bc.args={','.join(args)}")
        extra = ["-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline,
                 "-no-reboot", "-serial", f"file:{self.console_path}", "-serial", f"file:{self.ack_path}"]
        super().__init__(workdir, disks, name=name, accel=accel, memory_mib=256, extra_args=extra)
        self.acklog = AckLog(self.ack_path)

    def kill(self) -> None:
        super().kill()
        self.acklog.stop()

    def quit(self) -> None:
        super().quit()
        self.acklog.stop()

    def wait_exit(self, timeout: float = 120.0) -> int:
        code = self.process.wait(timeout=timeout)
        self.acklog.stop()
        return code


@functools.cache
def pick_guest_accel(deadline: float = 8.0) -> str:
    """'kvm' only if the real guest boots, writes and powers off under KVM in time, else 'tcg'.

    On some hosts /dev/kvm exists but a guest hangs (nested virtualisation): seen here. The answer
    is cached per host boot next to the guest image, so a hanging KVM costs the deadline once.
    """
    if os.environ.get("BLOCKCOPY_ACCEL") in ("kvm", "tcg"):
        return os.environ["BLOCKCOPY_ACCEL"]
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    image = build()
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    memo = image.kernel.parent / f"accel-{boot_id}"
    if memo.exists():
        return memo.read_text().strip()
    accel = _probe_kvm(image, deadline)
    memo.write_text(accel)
    return accel


def _probe_kvm(image: GuestImage, deadline: float) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        disk = Path(tmp) / "probe.raw"
        disk.write_bytes(b"\0" * (1 << 20))
        acks = Path(tmp) / "acks"
        args = [QEMU, "-nodefaults", "-display", "none", "-machine", "q35,accel=kvm", "-m", "256",
                "-no-reboot", "-kernel", str(image.kernel), "-initrd", str(image.initrd),
                "-append", "console=ttyS0 quiet panic=-1 bc.disks=vda bc.args=-n,4,-p,3",
                "-serial", "null", "-serial", f"file:{acks}",
                "-drive", f"file={disk},format=raw,if=virtio"]
        try:
            proc = subprocess.run(args, capture_output=True, timeout=deadline, check=False)
        except subprocess.TimeoutExpired:
            return "tcg"
        return "kvm" if proc.returncode == 0 and acks.exists() and b"P 3" in acks.read_bytes() else "tcg"


@dataclass(frozen=True)
class Verification:
    checked: int  # acknowledged (disk, offset) places checked (the last ack at each place)
    problems: list[str]


def read_raw(image: str, fmt: str) -> bytes:
    """The guest-visible bytes of an image, read without taking QEMU's locks."""
    with tempfile.NamedTemporaryFile(suffix=".raw") as out:
        subprocess.run(["qemu-img", "convert", "--image-opts", image_opts(image, fmt), "-O", "raw", out.name],
                       check=True, capture_output=True)
        return Path(out.name).read_bytes()


def parse_block(data: bytes, offset: int) -> tuple[int, int, int, int, bool] | None:
    """(run, disk, seq, offset, checksum ok) of the block at ``offset``, or None without magic."""
    block = data[offset:offset + BLOCK]
    if len(block) < BLOCK or block[:8] != MAGIC:
        return None
    run, disk, seq, off, checksum = struct.unpack_from("<IIQQI", block, 8)
    zeroed = block[:32] + b"\0\0\0\0" + block[36:]
    return run, disk, seq, off, _fnv1a(zeroed) == checksum


def _fnv1a(data: bytes) -> int:
    h = 2166136261
    for byte in data:
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


def verify(image: str, fmt: str, acks: list[Ack], disk: int, run_id: int,
           data: bytes | None = None) -> Verification:
    """Every acknowledged write of ``disk`` is on ``image``: a valid block with a sequence at least
    the last acknowledged one at its offset (a later write to the same slot may have replaced it)."""
    last: dict[int, int] = {}
    for ack in acks:
        if ack.disk == disk:
            last[ack.offset] = max(ack.seq, last.get(ack.offset, 0))
    data = data if data is not None else read_raw(image, fmt)
    problems = []
    for offset, seq in sorted(last.items()):
        found = parse_block(data, offset)
        if found is None:
            problems.append(f"disk {disk} offset {offset}: acknowledged write {seq} missing")
            continue
        f_run, f_disk, f_seq, f_off, ok = found
        if not ok or f_run != run_id or f_disk != disk or f_off != offset:
            problems.append(f"disk {disk} offset {offset}: corrupt or foreign block (seq {f_seq})")
        elif f_seq < seq:
            problems.append(f"disk {disk} offset {offset}: holds write {f_seq}, acknowledged {seq} is lost")
    return Verification(len(last), problems)


def writes_present(image: str, fmt: str, acks: list[Ack], disk: int) -> int:
    """How many of ``acks`` (for ``disk``) an image holds (the negative control uses this)."""
    data = read_raw(image, fmt)
    present = 0
    for ack in acks:
        if ack.disk != disk:
            continue
        found = parse_block(data, ack.offset)
        if found is not None and found[2] >= ack.seq and found[4]:
            present += 1
    return present
