"""Keeps the kernel writing destination files out while a mirror copies into them.

Only files the mirror writes through the host's page cache (``protocol.in_page_cache_while_copying``):
a DEST of a page-cached disk, or one filled so on request (``--page-cache-fill``). An O_DIRECT DEST
leaves nothing to write out.

Before a mirror job reports ``ready`` QEMU flushes the target, and guest writes wait for that
flush: in write-blocking mode each one is also written to the target, and (as we read qcow2's
cache code) the metadata flush can ``fdatasync`` the file while holding the image's lock. After an
unthrottled copy the page cache holds nearly everything copied: with 256 MiB the guest's writes
stalled about 115 ms here. The kernel does not hold writes back while another process syncs the
file, so syncing it from outside while the copy runs leaves QEMU's flush little to do: the same
copy then stalled the guest 19-32 ms (the mirror copying at 1.7 GB/s dirties that much during one
sync), and a 1 GiB copy finished sooner (the write-out overlaps the copy instead of following it).

A file is synced only once it has grown by ``threshold`` since its last sync (``st_blocks``, cheap
to read), so a slow or idle copy costs no device flushes; and the files are looked at about twice
per ``threshold`` of growth, so a throttled copy costs few wake-ups (each is about 0.2 ms of CPU).
A DEST written in place does not grow as the mirror fills it: a preallocated one
(``--preallocation falloc``/``full``) or a reused one (``--reuse-external``). The driver names
those; each is synced when a look finds it written (its mtime moved) without growth since the
previous look, at most every :meth:`Writeback.in_place_gap` (``PREALLOCATED_INTERVAL``, or about one
``threshold`` of copy at the job's speed limit), and while one is written so, the looks come by
that gap. A reused sparse file is synced by its growth while the looks see it grow; a look in a
pause of the copy may sync it as written in place, no more often than that gap. Until 2026-11-27
blockcopy never synced such a file (or only as far as it grew): the kernel's flusher wrote it after
30 s or past its background threshold, and QEMU's flush before ``ready`` the rest, while the
guest's writes waited.

Why ``fdatasync`` and not a call that only starts the write-out (2026-11-27, README, Benchmarks,
"The destination's write-out"): ``posix_fadvise(DONTNEED)`` alone copied faster on libvirt's rig,
but the guest's largest gap before ``ready`` about doubled (QEMU's flush before ``ready`` then had
the whole copy to make durable, the likely reason); with an ``fdatasync`` per 32 MiB in between the
gap was no better than with this code in same-run A/Bs of six runs (which are noisy), the speed-up
mostly went, and one stall run of that version found an acknowledged guest write missing on DEST,
cause not known.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Callable, Iterable
from typing import NamedTuple

from blockcopy.images import open_to_sync

log = logging.getLogger(__name__)

INTERVAL = 0.02  # seconds between looks at the files while they grow fast
MAX_INTERVAL = 0.5  # ... and when they grow slowly or not at all
THRESHOLD = 8 * 1024 * 1024  # bytes of growth that make a file worth syncing
#: seconds between syncs of a file written in place while it is written, at least: its growth does not
#: show, so the syncs cannot follow the copy's speed; under a speed limit, about one per ``threshold``
#: of copy at that speed instead
PREALLOCATED_INTERVAL = 0.1


def fdatasync_path(path: str) -> None:
    """fdatasync ``path`` if it is a regular file (see :func:`images.open_to_sync`)."""
    fd = open_to_sync(path)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fdatasync(fd)
    finally:
        os.close(fd)


class Look(NamedTuple):
    """What one ``lstat`` of a destination file says."""

    allocated: int  # bytes
    mtime_ns: int  # moves with writes, at most once per tick of the file system's clock (a few ms)


def look(path: str) -> Look | None:
    """None for what there is nothing to do about: no file (yet), or not a regular file (a block
    device, whose node's mtime moves with writes although nothing of it is in the page cache)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return Look(st.st_blocks * 512, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


class Writeback:
    def __init__(self, paths: Iterable[str], *, interval: float = INTERVAL, max_interval: float = MAX_INTERVAL,
                 threshold: int = THRESHOLD, sync: Callable[[str], None] = fdatasync_path,
                 in_place: Iterable[str] = (), bandwidth: int = 0) -> None:
        self.paths = tuple(paths)
        self.interval = interval
        self.max_interval = max_interval
        self.threshold = threshold
        self.sync = sync
        self._synced: dict[str, Look] = {}  # each file as it was at its last sync (in place: or first seen)
        self._previous: dict[str, Look] = {}  # each file at the previous look
        self._failed: set[tuple[str, int | None]] = set()  # (path, errno) already logged
        #: the files written in place (preallocated or reused): synced when written, at most every in_place_gap()
        self.in_place = frozenset(in_place)
        #: the copy's speed limit in bytes/s (0: none); a speed change starts a new Writeback
        self.bandwidth = bandwidth
        self._synced_at: dict[str, float] = {}  # loop time of each file's last sync

    def looks(self) -> dict[str, Look]:
        """A :func:`look` at each file that is there (one ``lstat`` each)."""
        return {path: found for path in self.paths if (found := look(path)) is not None}

    def see(self, looks: dict[str, Look]) -> None:
        """Take note of what each file holds: a file written in place seen for the first time holds
        nothing new, and a file that shrank (DEST discarded or replaced) grows from its new size."""
        for path, found in looks.items():
            synced = self._synced.get(path)
            first_in_place = synced is None and path in self.in_place
            if first_in_place or (synced is not None and found.allocated < synced.allocated):
                self._synced[path] = found

    def written_in_place(self, path: str, now: Look) -> bool:
        """Whether a file named as written in place was written since its last sync (its mtime
        moved) without growing since the previous look (a reused sparse file grows like any other)."""
        before, synced = self._previous.get(path), self._synced.get(path)
        return (path in self.in_place and synced is not None and before is not None
                and now.mtime_ns != synced.mtime_ns and now.allocated == before.allocated)

    def in_place_gap(self) -> float:
        """Seconds between syncs of a file written in place: PREALLOCATED_INTERVAL, or the time the
        copy takes for ``threshold`` at its speed limit when that is longer."""
        return max(PREALLOCATED_INTERVAL, self.threshold / self.bandwidth if self.bandwidth > 0 else 0.0)

    def due(self, looks: dict[str, Look], now: float = float("inf")) -> list[str]:
        """The files of ``looks`` that grew by ``threshold`` since blockcopy last synced them, and
        those written in place since, if their last sync is :meth:`in_place_gap` old (``now``: loop time)."""
        gap = self.in_place_gap()
        return [path for path, found in looks.items()
                if (self.written_in_place(path, found) and now - self._synced_at.get(path, -gap) >= gap)
                or found.allocated - (self._synced[path].allocated if path in self._synced else 0) >= self.threshold]

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
            self.see(looks)
            total = sum(found.allocated for found in looks.values())
            if last_total is not None:
                interval = self.next_interval(interval, total - last_total, now - last_look)
            gap, due = self.in_place_gap(), self.due(looks, now)
            # while a file is written in place, look again by the gap after its sync now, or when it
            # is due if not yet (the looks may be further apart than a long gap under a speed limit)
            for path, found in looks.items():
                if self.written_in_place(path, found):
                    waited = now - self._synced_at.get(path, -gap)
                    interval = min(interval, gap if path in due else max(self.interval, gap - waited), gap)
            last_total, last_look = total, now
            for path in due:
                try:
                    await asyncio.to_thread(self.sync, path)
                except OSError as exc:  # an optimisation only; QEMU reports real I/O errors
                    if (path, exc.errno) not in self._failed:  # (once: a look may come 50 times a second)
                        self._failed.add((path, exc.errno))
                        log.info("writeback of %s: %s", path, exc)
                self._synced[path], self._synced_at[path] = looks[path], now
            self._previous = looks
            await asyncio.sleep(interval)
