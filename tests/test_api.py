"""The Python API for management apps, in-process, as the README shows it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import MIB, has_pattern

from blockcopy import Authority, CopyRequest, Manager, NotReady, Outcome, UsageError


def test_manager_copy_ready_pivot_recover(vm_factory, tmp_path: Path) -> None:
    vm = vm_factory(2)
    dests = [str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")]
    seen: list[int] = []

    async def scenario() -> None:
        manager = Manager(tmp_path / "state")
        try:
            await manager.attach("vm", str(vm.qmp_socket))
            assert [d.name for d in await manager.disks("vm")] == ["vda", "vdb"]
            slow = CopyRequest("vm", [("vda", dests[0]), ("vdb", dests[1])], bandwidth_mib=32)
            op = await manager.copy(slow)
            with pytest.raises(NotReady, match="not ready to pivot"):
                await manager.pivot(op.id)
            op = await manager.wait_ready(op.id, on_progress=lambda o: seen.append(o.disks[0].progress_current))
            assert all(d.job_status == "ready" for d in op.disks) and op.ready_at is not None
            vm.write_marker("vdb", 0x5A, 9 * MIB)
            op = await manager.pivot(op.id)
            assert op.outcome is Outcome.PIVOTED and op.authoritative is Authority.DESTINATION
            assert op.pause_window_ms is not None and op.pause_window_ms > 0
            assert (await manager.status(op.id)) == op
            assert await manager.recover() == []
            with pytest.raises(UsageError, match="already ended"):
                await manager.abort(op.id)
            history = [note for _at, _phase, note in manager.history(op.id)]
            assert history[-1] == "done"
        finally:
            manager.close()

    asyncio.run(scenario())
    assert seen and seen == sorted(seen)  # progress callbacks report a growing copy
    assert [vm.device_node(d)[1] for d in ("vda", "vdb")] == dests
    assert has_pattern(dests[1], 0x5A, 9 * MIB)


def test_default_buffer_is_one_second_of_a_speed_limit_within_1_and_16_mib() -> None:
    from blockcopy.defaults import default_buf_size
    mib = 1 << 20
    assert default_buf_size(0) == 4 * mib
    assert default_buf_size(mib // 2) == mib and default_buf_size(2 * mib) == 2 * mib
    assert default_buf_size(100 * mib) == 4 * mib


def test_every_public_name_loads_from_the_package() -> None:
    """``blockcopy`` loads its names on first use (PEP 562): its table of where each lives must
    name exactly what ``__all__`` promises, and each must load."""
    import blockcopy

    assert sorted([*blockcopy._WHERE, "__version__"]) == sorted(blockcopy.__all__)
    for name in blockcopy.__all__:
        assert getattr(blockcopy, name) is not None, name
