"""QEMU dies while blockcopy is away: the journal still names the image that holds the data."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from conftest import MIB, Blockcopy, has_pattern, qemu_jobs, wait_for

from blockcopy import images


def test_qemu_killed_during_the_copy_means_source(attached, bc: Blockcopy, tmp_path: Path) -> None:
    vm = attached(1)
    job = bc.ok("copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--bandwidth", "4", "--json").json
    wait_for(lambda: any(j["status"] == "running" for j in qemu_jobs(vm)), what="the mirror to run")
    vm.write_marker("vda", 0x3C, 10 * MIB)
    vm.kill()
    status = bc.ok("status", job["id"], "--json").json  # reconciles: QEMU is gone
    assert status["state"] == "concluded"
    assert status["outcome"] == "not-pivoted" and status["authoritative"] == "source"
    assert "QEMU exited while copying" in status["reason"] and status["error"] is None
    assert has_pattern(vm.disks[0].path, 0x3C, 10 * MIB)
    ok, report = images.check(vm.disks[0].path, "qcow2")
    assert ok, report
    assert bc.ok("recover", "--json").json == []


@pytest.mark.parametrize("death", ["kill", "quit"])
def test_qemu_gone_while_blockcopy_had_paused_the_guest(attached, bc: Blockcopy, tmp_path: Path,
                                                        death: str) -> None:
    vm = attached(1)
    vm.write_marker("vda", 0x4D, 6 * MIB)
    dest = tmp_path / "d.qcow2"
    crashed = bc("copy", "vm", "vda", str(dest), "--pivot", crash_at="qmp:stop")
    assert crashed.returncode == -signal.SIGKILL
    assert vm.run_state() == "paused"
    if death == "kill":
        vm.kill()
    else:
        vm.quit()  # what a management layer or a guest-triggered exit would do
    recovered = bc.ok("recover", "--json")
    assert recovered.stderr == ""
    result = recovered.json
    assert len(result) == 1
    job = result[0]
    assert job["outcome"] == "not-pivoted" and "QEMU exited during the pivot" in job["reason"]
    # The guest was paused (stop flushes) and the mirror was ready in write-blocking mode: both
    # images hold the same data, and blockcopy proved it by comparing them.
    assert job["authoritative"] == "both"
    for image in (vm.disks[0].path, str(dest)):
        assert has_pattern(image, 0x4D, 6 * MIB) and has_pattern(image, 0x11, 0, 4 * MIB)
    assert images.compare(vm.disks[0].path, "qcow2", str(dest), "qcow2")
