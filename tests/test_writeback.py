"""Writeback of destination files while a mirror fills them (real files; a recording write-out, or the real one)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest

from blockcopy import CopyRequest, Manager, driver
from blockcopy.vm import DiskSpec, fill_pattern, make_image
from blockcopy.writeback import Writeback, start_writeback

MIB = 1024 * 1024


def _grow(path: Path, mib: int) -> None:
    with open(path, "ab") as f:
        f.write(os.urandom(mib * MIB))


def resident(path: Path) -> int:
    """Bytes of ``path`` in the host's page cache (util-linux's fincore, which asks mincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def test_the_write_out_drops_what_is_already_written_from_the_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "dest"
    _grow(path, 32)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # written now: clean pages, which a plain fdatasync leaves in the cache
    finally:
        os.close(fd)
    assert resident(path) >= 24 * MIB, "the test needs a page-cached file system under tmp_path"
    start_writeback(str(path))
    assert resident(path) < 4 * MIB


def test_the_write_out_never_follows_a_symlink_swapped_in(tmp_path: Path) -> None:
    target = tmp_path / "someone-elses"
    _grow(target, 8)
    fd = os.open(target, os.O_RDONLY)
    os.fdatasync(fd)
    os.close(fd)
    link = tmp_path / "dest"
    link.symlink_to(target)
    try:
        start_writeback(str(link))
    except OSError as exc:
        assert exc.errno == 40  # ELOOP: O_NOFOLLOW
    else:
        raise AssertionError("followed the symlink")
    assert resident(target) >= 6 * MIB  # nothing of the other file was dropped


def test_files_written_since_their_write_out_last_started_are_due(tmp_path: Path) -> None:
    written, quiet, missing = tmp_path / "written", tmp_path / "quiet", tmp_path / "missing"
    _grow(written, 1)
    _grow(quiet, 1)
    wb = Writeback([str(written), str(quiet), str(missing)], threshold=2 * MIB, write_out=lambda p: None)
    first = wb.looks()
    assert str(missing) not in first
    wb._started.update(first)  # as run() does on first sight
    assert wb.due(first) == []  # nothing written since
    time.sleep(0.01)  # (mtime moves with the file system's clock tick)
    _grow(written, 1)  # less than the threshold: the threshold only paces the looks now
    assert wb.due(wb.looks()) == [str(written)]


def test_a_file_is_fdatasynced_each_time_it_grew_by_flush_every_and_written_out_on_every_look(
        tmp_path: Path) -> None:
    """The write-out is started on every look at a file written since the last; the device's cache
    is flushed once per ``flush_every`` of growth, so that QEMU's flush before `ready` has little left."""
    path = tmp_path / "dest"
    path.touch()
    calls: list[str] = []
    wb = Writeback([str(path)], interval=0.01, max_interval=0.05, threshold=MIB, flush_every=4 * MIB,
                   write_out=lambda p: calls.append("start"), flush=lambda p: calls.append("flush"))

    async def scenario() -> None:
        task = asyncio.create_task(wb.run())
        await asyncio.sleep(0.05)  # its first look
        for spurt in range(1, 6):  # 5 spurts of 2 MiB: 10 MiB, two flush_every's worth
            _grow(path, 2)
            for _ in range(200):
                if calls.count("start") >= spurt:
                    break
                await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(scenario())
    assert calls.count("start") == 5, calls
    assert calls.count("flush") == 2, calls  # at 4 and 8 MiB
    assert calls[calls.index("flush") + 1] == "start"  # the flush first: the start then drops its pages


def test_a_preallocated_file_written_in_place_is_looked_at_often(tmp_path: Path) -> None:
    """Its growth does not show, so the looks would back off to MAX_INTERVAL; written in place, it
    is looked at (and its write-out started) every PREALLOCATED_INTERVAL instead."""
    preallocated = tmp_path / "preallocated"
    with open(preallocated, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 16 * MIB)
    kicked: list[str] = []
    flushed: list[str] = []
    wb = Writeback([str(preallocated)], interval=0.01, max_interval=0.5, threshold=MIB, flush_every=4 * MIB,
                   write_out=kicked.append, flush=flushed.append)

    async def scenario() -> None:
        task = asyncio.create_task(wb.run())
        fd = os.open(preallocated, os.O_WRONLY)
        try:
            for i in range(16):  # 1.0 s of writes in place, as a mirror into a preallocated DEST
                await asyncio.sleep(0.0625)
                os.pwrite(fd, os.urandom(65536), i * MIB)
        finally:
            os.close(fd)
        task.cancel()

    asyncio.run(scenario())
    assert os.stat(preallocated).st_blocks * 512 == 16 * MIB  # never grew
    assert kicked.count(str(preallocated)) >= 6, kicked  # about 10; backed off to 0.5 s it would be 2-3
    assert flushed.count(str(preallocated)) >= 5, flushed  # written in place: its growth cannot say when


def test_run_writes_out_a_growing_destination_and_leaves_a_quiet_one_alone(tmp_path: Path) -> None:
    growing, quiet = tmp_path / "growing", tmp_path / "quiet"
    growing.touch()  # as created before the copy starts
    quiet.write_bytes(b"x")
    synced: list[str] = []
    wb = Writeback([str(growing), str(quiet)], interval=0.01, max_interval=0.05, threshold=MIB,
                   write_out=synced.append)

    async def scenario() -> None:
        task = asyncio.create_task(wb.run())
        await asyncio.sleep(0.05)  # its first look: what the files hold then is not news
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


def test_a_failing_write_out_does_not_stop_the_writeback(tmp_path: Path) -> None:
    path = tmp_path / "d"
    path.touch()
    calls: list[str] = []

    def flaky(p: str) -> None:
        calls.append(p)
        raise OSError(5, "I/O error")

    wb = Writeback([str(path)], interval=0.01, max_interval=0.05, threshold=MIB, write_out=flaky)

    async def scenario() -> None:
        task = asyncio.create_task(wb.run())
        await asyncio.sleep(0.05)  # its first look
        for spurt in (1, 2):
            _grow(path, 2)
            for _ in range(200):
                if len(calls) >= spurt:
                    break
                await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(scenario())
    assert len(calls) == 2


def test_a_real_copy_writes_out_its_destination_while_copying_and_stops_at_ready(vm_factory, tmp_path: Path,
                                                                              monkeypatch) -> None:
    source = make_image(tmp_path / "source.qcow2", 64 * MIB)
    fill_pattern(source, "qcow2", 0x3C, 0, 48 * MIB)
    vm = vm_factory([DiskSpec("vda", str(source))])
    dest = tmp_path / "dest.qcow2"
    synced: list[tuple[str, float]] = []

    class Recording(Writeback):
        def __init__(self, paths) -> None:  # type: ignore[no-untyped-def]
            super().__init__(paths, threshold=4 * MIB, write_out=lambda p: synced.append((p, time.time())))

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


@pytest.mark.parametrize("preallocation", [None, "falloc"])
def test_a_real_copy_does_not_leave_its_destination_in_the_page_cache(vm_factory, tmp_path: Path,
                                                                      preallocation: str | None) -> None:
    """At 64 MiB/s the disk keeps up with the mirror: every kick drops what the previous one wrote
    out, so at `ready` the page cache holds about the last kick's worth (8 MiB, or 0.1 s of copy
    for a preallocated DEST), not the copy."""
    source = make_image(tmp_path / "source.qcow2", 96 * MIB)
    fill_pattern(source, "qcow2", 0x3C, 0, 96 * MIB)
    vm = vm_factory([DiskSpec("vda", str(source))])
    dest = tmp_path / "dest.qcow2"

    async def scenario() -> None:
        manager = Manager(tmp_path / "state")
        try:
            await manager.attach("vm", str(vm.qmp_socket))
            op = await manager.copy(CopyRequest("vm", [("vda", str(dest))], bandwidth_mib=64,
                                                preallocation=preallocation),
                                    until=driver.Until.READY)
            assert op.ready_at is not None
        finally:
            manager.close()

    asyncio.run(scenario())
    assert dest.stat().st_blocks * 512 >= 96 * MIB
    assert resident(dest) < 48 * MIB, f"{resident(dest)} bytes of the 96 MiB copy are in the page cache"
