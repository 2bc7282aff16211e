"""Keeps the kernel writing destination files out while a mirror copies into them.

Before a mirror job reports ``ready`` QEMU flushes the target, and guest writes wait for that
flush: in write-blocking mode each one is also written to the target, and (as we read qcow2's
cache code) the metadata flush can ``fdatasync`` the file while holding the image's lock. After an
unthrottled copy the page cache holds nearly everything copied: with 256 MiB the guest's writes
stalled about 115 ms here. Writing DEST out from outside while the copy runs leaves QEMU's flush
little to do (the same copy then stalled the guest 19-32 ms), and the copy finishes sooner: the
write-out overlaps the copy instead of following it.

Two calls do it, measured against each other on libvirt's rig (README, Benchmarks, "The
destination's write-out"):

- ``posix_fadvise(POSIX_FADV_DONTNEED)`` on every look at a file written since the last one: Linux
  starts writing the dirty pages out without waiting for them (``WB_SYNC_NONE``) and drops the
  pages already written. Those are of little use: the mirror never reads DEST back, a DEST given
  O_DIRECT at the pivot is read past the page cache, and keeping every byte of a large copy cached
  would push out what the host caches for its other guests.
- ``fdatasync`` each time a file has grown by ``flush_every`` (and on every look at a preallocated
  file written in place), so that the disk's own write cache holds little when QEMU's flush before
  ``ready`` comes: the guest's writes wait for that flush. With the first call alone the copy was
  the fastest, but the guest's largest gap before ``ready`` was about 400 ms (libvirt's there is
  about 400 too); a flush per 32 MiB brought it to 130-170 ms for part of that speed (a flush per
  8 MiB: 90 ms and slower still). Until 2026-11-27 only an ``fdatasync`` per 8 MiB was done, with
  nothing started in between: slower than both, and a gap of about 200 ms.

Nothing here is needed for durability: QEMU's flush before ``ready`` makes the copy durable, and a
``finish`` fsyncs DEST itself.

A file counts as written when its mtime moved or it grew (one ``lstat``, cheap). The files are
looked at about twice per ``threshold`` of growth (``st_blocks``), so a throttled copy costs few
wake-ups (each is about 0.2 ms of CPU). A preallocated DEST (``--preallocation falloc``/``full``)
does not grow as the mirror fills it: a file that is fully allocated and at least ``flush_every``
large when first seen counts as preallocated, and while one is written, the files are looked at
every ``PREALLOCATED_INTERVAL`` and it is fdatasynced on each look.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

log = logging.getLogger(__name__)

INTERVAL = 0.02  # seconds between looks at the files while they grow fast
MAX_INTERVAL = 0.5  # ... and when they grow slowly or not at all
THRESHOLD = 8 * 1024 * 1024  # growth that the looks follow: about two looks per THRESHOLD
#: growth after which a file is fdatasynced (see the module's docstring for the trade-off)
FLUSH_EVERY = 32 * 1024 * 1024
#: seconds between looks while a file is written without growing (preallocated): its growth does
#: not show, so the looks cannot follow the copy's speed; what an unthrottled mirror writes in 0.1 s
#: is about what QEMU's flush before `ready` may then still have to write out
PREALLOCATED_INTERVAL = 0.1


def start_writeback(path: str) -> None:
    """Start writing out ``path``'s dirty pages and drop its pages already written (Linux's
    POSIX_FADV_DONTNEED); returns without waiting for the write-out."""
    with _regular_file(path) as fd:
        if fd is not None:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def fdatasync_path(path: str) -> None:
    """Write out ``path``'s dirty pages and flush the device's cache, waiting for both."""
    with _regular_file(path) as fd:
        if fd is not None:
            os.fdatasync(fd)


@contextlib.contextmanager
def _regular_file(path: str) -> Iterator[int | None]:
    # Never through a symlink, never blocking on a FIFO swapped in for DEST.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        yield fd if stat.S_ISREG(os.fstat(fd).st_mode) else None
    finally:
        os.close(fd)


class Look(NamedTuple):
    """What one ``lstat`` of a destination file says."""

    allocated: int  # bytes
    size: int  # bytes
    mtime_ns: int  # moves with every write


def look(path: str) -> Look | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None  # not there (yet), or not a local file: nothing to do
    return Look(st.st_blocks * 512, st.st_size, st.st_mtime_ns)


class Writeback:
    def __init__(self, paths: Iterable[str], *, interval: float = INTERVAL, max_interval: float = MAX_INTERVAL,
                 threshold: int = THRESHOLD, write_out: Callable[[str], None] = start_writeback,
                 flush: Callable[[str], None] = fdatasync_path, flush_every: int = FLUSH_EVERY) -> None:
        self.paths = tuple(paths)
        self.interval = interval
        self.max_interval = max_interval
        self.threshold = threshold
        self.write_out = write_out
        self.flush = flush
        self.flush_every = flush_every
        #: each file as it was when its write-out was last started, or when first seen
        self._started: dict[str, Look] = {}
        self._flushed: dict[str, int] = {}  # allocated bytes of each file at its last flush, or when first seen
        #: files that were fully allocated (and at least ``flush_every`` large) when first seen: a
        #: preallocated DEST, whose growth cannot show how much the mirror has written
        self._preallocated: set[str] = set()

    def looks(self) -> dict[str, Look]:
        """A :func:`look` at each file that is there."""
        return {path: found for path in self.paths if (found := look(path)) is not None}

    def due(self, looks: dict[str, Look]) -> list[str]:
        """The files written since their write-out was last started (or since first seen): their
        mtime moved, or they grew (the mtime moves with the file system's clock tick, a few ms)."""
        return [path for path, now in looks.items() if path in self._started and now != self._started[path]]

    def written_in_place(self, path: str, now: Look) -> bool:
        """Whether a preallocated file was written since its write-out was last started."""
        before = self._started.get(path)
        return path in self._preallocated and before is not None and now.mtime_ns != before.mtime_ns

    def to_flush(self, path: str, now: Look) -> bool:
        """Whether a due file is to be fdatasynced too: it grew by ``flush_every`` since its last
        flush, or it is preallocated (its growth does not show)."""
        return path in self._preallocated or now.allocated - self._flushed.get(path, 0) >= self.flush_every

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
            if any(self.written_in_place(path, found) for path, found in looks.items()):
                interval = min(interval, PREALLOCATED_INTERVAL)
            last_total, last_look = total, now
            for path, found in looks.items():
                if path not in self._started:  # first seen: what it holds is not news
                    self._started[path], self._flushed[path] = found, found.allocated
                    if found.allocated >= found.size >= self.flush_every:
                        self._preallocated.add(path)
            for path in self.due(looks):
                flush = self.to_flush(path, looks[path])
                try:
                    await asyncio.to_thread(self._write_out, path, flush)
                except OSError as exc:  # an optimisation only; QEMU reports real I/O errors
                    log.info("writeback of %s: %s", path, exc)
                self._started[path] = looks[path]
                if flush:
                    self._flushed[path] = looks[path].allocated
            await asyncio.sleep(interval)

    def _write_out(self, path: str, flush: bool) -> None:
        if flush:
            self.flush(path)  # (first: then the write-out below also drops what it wrote)
        self.write_out(path)
