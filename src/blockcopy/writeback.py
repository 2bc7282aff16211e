"""Keeps the kernel writing destination files out while a mirror copies into them.

Before a mirror job reports ``ready`` QEMU flushes the target, and guest writes wait for that
flush: in write-blocking mode each one is also written to the target, and (as we read qcow2's
cache code) the metadata flush can ``fdatasync`` the file while holding the image's lock. After an
unthrottled copy the page cache holds nearly everything copied: with 256 MiB the guest's writes
stalled about 115 ms here. The kernel does not hold writes back while another process syncs the
file, so syncing it from outside while the copy runs leaves QEMU's flush little to do: the same
copy then stalled the guest 10-17 ms, and a 1 GiB copy finished sooner (the write-out overlaps the
copy instead of following it).

A file is synced only once it has grown by ``threshold`` since its last sync (``st_blocks``, cheap
to read), so a slow or idle copy costs no device flushes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

INTERVAL = 0.05  # seconds between looks at the files
THRESHOLD = 8 * 1024 * 1024  # bytes of growth that make a file worth syncing


def fdatasync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def allocated_bytes(path: str) -> int | None:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return None  # not there (yet), or not a local file: nothing to do


class Writeback:
    def __init__(self, paths: Iterable[str], *, interval: float = INTERVAL, threshold: int = THRESHOLD,
                 sync: Callable[[str], None] = fdatasync_path) -> None:
        self.paths = tuple(paths)
        self.interval = interval
        self.threshold = threshold
        self.sync = sync
        self._synced_at: dict[str, int] = {}

    def due(self) -> list[str]:
        """The files that grew by ``threshold`` since blockcopy last synced them."""
        due = []
        for path in self.paths:
            size = allocated_bytes(path)
            if size is None:
                continue
            if size - self._synced_at.get(path, 0) >= self.threshold:
                due.append(path)
        return due

    async def run(self) -> None:
        """Until cancelled."""
        while True:
            for path in self.due():
                size = allocated_bytes(path)
                try:
                    await asyncio.to_thread(self.sync, path)
                except OSError as exc:  # an optimisation only; QEMU reports real I/O errors
                    log.info("writeback of %s: %s", path, exc)
                if size is not None:
                    self._synced_at[path] = size
            await asyncio.sleep(self.interval)
