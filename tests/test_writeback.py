"""Writeback of destination files while a mirror fills them (real files, a recording sync)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

from blockcopy import CopyRequest, Manager, driver
from blockcopy.vm import DiskSpec, fill_pattern, make_image
from blockcopy.writeback import Writeback

MIB = 1024 * 1024


def _grow(path: Path, mib: int) -> None:
    with open(path, "ab") as f:
        f.write(os.urandom(mib * MIB))


def test_only_files_that_grew_by_the_threshold_are_due(tmp_path: Path) -> None:
    big, small, missing = tmp_path / "big", tmp_path / "small", tmp_path / "missing"
    _grow(big, 3)
    _grow(small, 1)
    synced: list[str] = []
    wb = Writeback([str(big), str(small), str(missing)], threshold=2 * MIB, sync=synced.append)
    assert wb.due(wb.looks()) == [str(big)]


def test_a_preallocated_file_written_in_place_is_synced_often_and_left_alone_once_quiet(tmp_path: Path) -> None:
    """Its growth does not show: by growth alone it would never be synced, and the looks would back
    off to MAX_INTERVAL; named as written in place, it is synced every PREALLOCATED_INTERVAL while
    it is written, and no more once it is not."""
    preallocated = tmp_path / "preallocated"
    with open(preallocated, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 16 * MIB)
    synced: list[str] = []
    wb = Writeback([str(preallocated)], interval=0.01, max_interval=0.5, threshold=MIB, sync=synced.append,
                   in_place=[str(preallocated)])
    written: list[int] = []

    async def scenario() -> None:
        task = asyncio.create_task(wb.run())
        await asyncio.sleep(0.05)  # its first look: nothing written yet, nothing to sync
        assert synced == []
        fd = os.open(preallocated, os.O_WRONLY)
        try:
            for i in range(16):  # 1.0 s of writes in place, as a mirror into a preallocated DEST
                await asyncio.sleep(0.0625)
                os.pwrite(fd, os.urandom(65536), i * MIB)
        finally:
            os.close(fd)
        settled, last = 0.0, -1  # the last write's sync: until the count holds still for 0.5 s
        while settled < 0.5:
            await asyncio.sleep(0.05)
            settled, last = (settled + 0.05, last) if len(synced) == last else (0.0, len(synced))
        written.append(len(synced))
        await asyncio.sleep(0.7)  # quiet
        task.cancel()

    asyncio.run(scenario())
    assert os.stat(preallocated).st_blocks * 512 >= 16 * MIB  # never grew
    assert written[0] >= 6, synced  # about 10; backed off to 0.5 s it would be 2-3
    assert len(synced) == written[0], "synced again although nothing was written"


def test_under_a_speed_limit_a_file_written_in_place_is_synced_about_once_per_threshold(tmp_path: Path) -> None:
    preallocated = tmp_path / "preallocated"
    with open(preallocated, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 16 * MIB)
    synced: list[str] = []
    # 2 MiB/s and 1 MiB between syncs: one every 0.5 s, not every PREALLOCATED_INTERVAL
    wb = Writeback([str(preallocated)], interval=0.01, max_interval=0.5, threshold=MIB, sync=synced.append,
                   in_place=[str(preallocated)], bandwidth=2 * MIB)
    fd = os.open(preallocated, os.O_WRONLY)
    try:
        _run_while(wb, lambda i: os.pwrite(fd, os.urandom(65536), i * MIB))
    finally:
        os.close(fd)
    assert 1 <= len(synced) <= 3, synced  # 1.1 s of writes; about 10 without the limit
    assert wb._synced_at, "never synced"


def test_what_is_not_a_regular_file_is_never_looked_at(tmp_path: Path) -> None:
    """A reused block device's node moves its mtime with every write, though nothing of it is in
    the page cache: it would be synced on every look."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    wb = Writeback(["/dev/null", str(fifo)], in_place=["/dev/null", str(fifo)], sync=lambda p: None)
    assert wb.looks() == {}


def _run_while(wb: Writeback, writes) -> None:  # type: ignore[no-untyped-def]
    """Run ``wb`` while ``writes`` (a callable of the step number) is called every 62.5 ms, 16 times."""
    async def scenario() -> None:
        task = asyncio.create_task(wb.run())
        await asyncio.sleep(0.05)  # its first look
        for i in range(16):
            await asyncio.sleep(0.0625)
            writes(i)
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(scenario())


def test_a_reused_sparse_file_that_grows_is_synced_by_its_growth_not_on_every_look(tmp_path: Path) -> None:
    path = tmp_path / "reused"
    with open(path, "wb") as f:
        f.truncate(64 * MIB)  # reused, sparse: the copy allocates it as it goes
    synced: list[str] = []
    wb = Writeback([str(path)], interval=0.01, max_interval=0.5, threshold=4 * MIB, sync=synced.append,
                   in_place=[str(path)])
    fd = os.open(path, os.O_WRONLY)
    try:
        _run_while(wb, lambda i: os.pwrite(fd, os.urandom(MIB), i * MIB))  # 16 MiB, 1 MiB a time
    finally:
        os.close(fd)
    assert 2 <= len(synced) <= 5, synced  # about one per 4 MiB; on every look it would be about 16


def test_a_file_that_shrank_is_synced_again_as_it_grows_back(tmp_path: Path) -> None:
    path = tmp_path / "dest"
    _grow(path, 16)
    synced: list[str] = []
    wb = Writeback([str(path)], interval=0.01, max_interval=0.05, threshold=4 * MIB, sync=synced.append)

    def writes(i: int) -> None:
        if i == 0:
            os.truncate(path, 0)  # discarded, or replaced by a new file
        elif i <= 12:
            _grow(path, 1)  # 12 MiB: less than the 16 MiB it had when last synced

    _run_while(wb, writes)
    assert len(synced) >= 3, synced  # the first look's sync of the 16 MiB, then per 4 MiB regrown


def test_a_failing_sync_is_logged_once(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "preallocated"
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 16 * MIB)

    def failing(p: str) -> None:
        raise OSError(5, "I/O error")

    wb = Writeback([str(path)], interval=0.01, max_interval=0.5, threshold=MIB, sync=failing, in_place=[str(path)])
    fd = os.open(path, os.O_WRONLY)
    try:
        with caplog.at_level(logging.INFO, logger="blockcopy.writeback"):
            _run_while(wb, lambda i: os.pwrite(fd, b"x" * 4096, i * MIB))
    finally:
        os.close(fd)
    assert len([r for r in caplog.records if "I/O error" in r.getMessage()]) == 1


def test_run_syncs_a_growing_destination_and_leaves_a_quiet_one_alone(tmp_path: Path) -> None:
    growing, quiet = tmp_path / "growing", tmp_path / "quiet"
    quiet.write_bytes(b"x")
    synced: list[str] = []
    wb = Writeback([str(growing), str(quiet)], interval=0.01, max_interval=0.05, threshold=MIB,
                   sync=synced.append)

    async def scenario() -> None:
        task = asyncio.create_task(wb.run())
        for spurt in range(1, 4):
            _grow(growing, 2)  # as the mirror would
            for _ in range(200):
                if len(synced) >= spurt:
                    break
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(scenario())
    assert synced.count(str(growing)) == 3, synced  # once per growth spurt, not once per look
    assert str(quiet) not in synced


def test_looks_often_while_files_grow_fast_and_rarely_when_slow_or_quiet() -> None:
    wb = Writeback([], interval=0.05, max_interval=0.5, threshold=8 * MIB)
    assert wb.next_interval(0.05, 1024 * MIB, 1.0) == 0.05  # an unthrottled mirror: as often as allowed
    assert wb.next_interval(0.05, 8 * MIB, 1.0) == 0.5  # 8 MiB/s: twice per 8 MiB
    assert wb.next_interval(0.05, 16 * MIB, 1.0) == 0.25
    assert wb.next_interval(0.1, 0, 0.1) == 0.2  # quiet: back off ...
    assert wb.next_interval(0.4, 0, 0.4) == 0.5  # ... up to the cap


def test_a_failing_sync_does_not_stop_the_writeback(tmp_path: Path) -> None:
    path = tmp_path / "d"
    calls: list[str] = []

    def flaky(p: str) -> None:
        calls.append(p)
        raise OSError(5, "I/O error")

    wb = Writeback([str(path)], interval=0.01, max_interval=0.05, threshold=MIB, sync=flaky)

    async def scenario() -> None:
        task = asyncio.create_task(wb.run())
        for spurt in (1, 2):
            _grow(path, 2)
            for _ in range(200):
                if len(calls) >= spurt:
                    break
                await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(scenario())
    assert len(calls) == 2


def test_a_real_copy_syncs_its_destination_while_copying_and_stops_at_ready(vm_factory, tmp_path: Path,
                                                                              monkeypatch) -> None:
    source = make_image(tmp_path / "source.qcow2", 64 * MIB)
    fill_pattern(source, "qcow2", 0x3C, 0, 48 * MIB)
    vm = vm_factory([DiskSpec("vda", str(source))])
    dest = tmp_path / "dest.qcow2"
    synced: list[tuple[str, float]] = []

    class Recording(Writeback):
        def __init__(self, paths, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(paths, threshold=4 * MIB, sync=lambda p: synced.append((p, time.time())), **kwargs)

    monkeypatch.setattr(driver, "Writeback", Recording)

    async def scenario() -> float:
        manager = Manager(tmp_path / "state")
        try:
            await manager.attach("vm", str(vm.qmp_socket))
            op = await manager.copy(CopyRequest("vm", [("vda", str(dest))], bandwidth_mib=64),
                                    until=driver.Until.READY)
            assert op.ready_at is not None
            ready_seen = time.time()
            # Grow the destination after ready (write-blocking mirrors new clusters into it): a
            # writeback left running would sync it now.
            vm.write_marker("vda", 0x44, 52 * MIB, 8 * MIB)
            await asyncio.sleep(0.3)
            return ready_seen
        finally:
            manager.close()

    ready_seen = asyncio.run(scenario())
    assert synced and {p for p, _ in synced} == {str(dest)}
    assert all(at <= ready_seen for _, at in synced), "no writeback once the copy is ready"


def _synced_while_copying(vm_factory, tmp_path: Path, monkeypatch, dest: Path,  # type: ignore[no-untyped-def]
                          **request: Any) -> list[str]:
    """The writeback's syncs of a real copy into ``dest`` at 32 MiB/s, until the copy is ready."""
    source = make_image(tmp_path / "source.qcow2", 64 * MIB)
    fill_pattern(source, "qcow2", 0x3C, 0, 48 * MIB)
    vm = vm_factory([DiskSpec("vda", str(source))])
    synced: list[str] = []

    class Recording(Writeback):
        def __init__(self, paths, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(paths, threshold=4 * MIB, sync=synced.append, **kwargs)

    monkeypatch.setattr(driver, "Writeback", Recording)

    async def scenario() -> None:
        manager = Manager(tmp_path / "state")
        try:
            await manager.attach("vm", str(vm.qmp_socket))
            op = await manager.copy(CopyRequest("vm", [("vda", str(dest))], bandwidth_mib=32, **request),
                                    until=driver.Until.READY)
            assert op.ready_at is not None
        finally:
            manager.close()

    asyncio.run(scenario())
    return synced


def test_a_real_copy_into_a_preallocated_destination_syncs_it_while_copying(vm_factory, tmp_path: Path,
                                                                           monkeypatch) -> None:
    dest = tmp_path / "dest.qcow2"
    synced = _synced_while_copying(vm_factory, tmp_path, monkeypatch, dest, preallocation="falloc")
    assert synced.count(str(dest)) >= 2, synced  # 1.5 s at 32 MiB/s, one per 4 MiB at that speed: about 5


def test_a_real_copy_into_a_reused_destination_syncs_it_while_copying(vm_factory, tmp_path: Path,
                                                                     monkeypatch) -> None:
    """A reused DEST (here a fully written raw file, as an old copy would be) is synced while the
    mirror fills it. (QEMU may first punch a reused DEST's blocks away with zero writes, and then it
    grows again; the test does not tell that from a DEST filled in place.)"""
    dest = tmp_path / "dest.raw"
    with open(dest, "wb") as f:
        for _ in range(64):
            f.write(b"\xee" * MIB)
    synced = _synced_while_copying(vm_factory, tmp_path, monkeypatch, dest, reuse_external=True, format="raw")
    assert synced.count(str(dest)) >= 2, synced  # 2 s at 32 MiB/s, one per 4 MiB at that speed: about 6
