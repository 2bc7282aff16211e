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

A file's write-out is started when it was written since the last start (its mtime moved or it
grew; one ``lstat``, cheap). The files are looked at about twice per ``threshold`` of growth (``st_blocks``),
so a throttled copy costs few wake-ups (each is about 0.2 ms of CPU). A preallocated DEST
(``--preallocation falloc``/``full``) does not grow as the mirror fills it: while one is written in
place, the files are looked at every ``PREALLOCATED_INTERVAL``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Callable, Iterable
from typing import NamedTuple

log = logging.getLogger(__name__)

INTERVAL = 0.02  # seconds between looks at the files while they grow fast
MAX_INTERVAL = 0.5  # ... and when they grow slowly or not at all
THRESHOLD = 8 * 1024 * 1024  # growth that the looks follow: about two looks per THRESHOLD
#: seconds between looks while a file is written without growing (preallocated): its growth does
#: not show, so the looks cannot follow the copy's speed; what an unthrottled mirror writes in 0.1 s
#: is about what QEMU's flush before `ready` may then still have to write out
PREALLOCATED_INTERVAL = 0.1


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


class Look(NamedTuple):
    """What one ``lstat`` of a destination file says."""

    allocated: int  # bytes
    mtime_ns: int  # moves with every write


def look(path: str) -> Look | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None  # not there (yet), or not a local file: nothing to do
    return Look(st.st_blocks * 512, st.st_mtime_ns)


class Writeback:
    def __init__(self, paths: Iterable[str], *, interval: float = INTERVAL, max_interval: float = MAX_INTERVAL,
                 threshold: int = THRESHOLD, write_out: Callable[[str], None] = start_writeback) -> None:
        self.paths = tuple(paths)
        self.interval = interval
        self.max_interval = max_interval
        self.threshold = threshold
        self.write_out = write_out
        #: each file as it was when its write-out was last started, or when first seen
        self._started: dict[str, Look] = {}

    def looks(self) -> dict[str, Look]:
        """A :func:`look` at each file that is there."""
        return {path: found for path in self.paths if (found := look(path)) is not None}

    def due(self, looks: dict[str, Look]) -> list[str]:
        """The files written since their write-out was last started (or since first seen): their
        mtime moved, or they grew (the mtime moves with the file system's clock tick, a few ms)."""
        return [path for path, now in looks.items() if path in self._started and now != self._started[path]]

    def written_in_place(self, looks: dict[str, Look]) -> bool:
        """Whether a file was written since the last start without growing (preallocated)."""
        return any(path in self._started and now.mtime_ns != self._started[path].mtime_ns
                   and now.allocated == self._started[path].allocated for path, now in looks.items())

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
            looks, now = await asyncio.to_thread(self.looks), loop.time()  # (stat may hang on bad storage)
            total = sum(found.allocated for found in looks.values())
            if last_total is not None:
                interval = self.next_interval(interval, total - last_total, now - last_look)
            if self.written_in_place(looks):
                interval = min(interval, PREALLOCATED_INTERVAL)
            last_total, last_look = total, now
            for path, found in looks.items():
                self._started.setdefault(path, found)  # first seen: what it holds is not news
            for path in self.due(looks):
                try:
                    await asyncio.to_thread(self.write_out, path)
                except OSError as exc:  # an optimisation only; QEMU reports real I/O errors
                    log.info("writeback of %s: %s", path, exc)
                self._started[path] = looks[path]
            await asyncio.sleep(interval)
