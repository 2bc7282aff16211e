"""End to end with a real guest: a tiny Linux VM writes self-describing blocks with O_DIRECT and
reports each acknowledged write; every one must be on the image the journal names."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MIB, Blockcopy

from blockcopy.guest.session import GuestVM, pick_guest_accel, verify, writes_present
from blockcopy.journal import Journal
from blockcopy.vm import DiskSpec, make_image


@pytest.fixture(scope="session")
def guest_accel() -> str:
    return pick_guest_accel()


@pytest.fixture
def guest(tmp_path: Path, guest_accel: str) -> Iterator[Callable[..., GuestVM]]:
    vms: list[GuestVM] = []

    def start(disks: int = 1, *, size: int = 32 * MIB, **kwargs: Any) -> GuestVM:
        specs = [DiskSpec(f"vd{'abcd'[i]}", str(make_image(tmp_path / f"src{i}.qcow2", size)))
                 for i in range(disks)]
        vm = GuestVM(tmp_path, specs, accel=guest_accel, **kwargs)
        vms.append(vm)
        vm.acklog.wait_for(20 * disks)  # booted and writing
        return vm

    yield start
    for vm in vms:
        vm.kill()


def _journal_op(bc: Blockcopy, job_id: str) -> Any:
    journal = Journal(bc.state_dir, create=False)
    try:
        return journal.get(job_id)
    finally:
        journal.close()


@pytest.mark.parametrize("disks", [1, 2])
def test_pivot_while_the_guest_writes_loses_nothing(guest, bc: Blockcopy, tmp_path: Path, disks: int,
                                                     report: Any) -> None:
    vm = guest(disks)
    bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
    dests = [tmp_path / f"dest{i}.qcow2" for i in range(disks)]
    pairs = [f"--disk={d.id}={dest}" for d, dest in zip(vm.disks, dests, strict=True)]
    before = vm.acklog.count()
    job = bc.ok("copy", "vm", *pairs, "--pivot", "--json").json
    assert job["outcome"] == "pivoted"
    assert vm.acklog.count() > before, "the guest wrote during the copy"
    at_pivot = vm.acklog.count()
    vm.acklog.wait_for(at_pivot + 100 * disks)  # the guest keeps writing after the pivot
    vm.cmd("stop")  # flushes: what the guest wrote is now visible in the image files
    time.sleep(0.2)
    acks = list(vm.acklog.acks)
    op = _journal_op(bc, job["id"])
    for i in range(disks):
        assert vm.device_node(vm.disks[i].id)[1] == str(dests[i])
        result = verify(str(dests[i]), "qcow2", acks, i, vm.run_id)
        assert result.checked > 0 and not result.problems, result.problems[:5]
        # Negative control: writes made after the pivot are not on the old source.
        after = [a for a in acks if a.at > op.resume_ts + 0.05 and a.disk == i]
        assert after, "no writes after the pivot to check"
        assert writes_present(vm.disks[i].path, "qcow2", after, i) == 0
        assert writes_present(str(dests[i]), "qcow2", after, i) == len(after)
    stall = vm.acklog.max_gap(op.stop_ts, op.ended_at or op.resume_ts)  # the pivot's gap, as demo.py
    report("guest", f"pivot {disks} disk(s), guest writing ({vm.accel}): blockcopy pause window "
                         f"{op.pause_window_ms:.1f} ms, largest gap between guest acks around it "
                         f"{stall * 1000:.1f} ms, {len(acks)} acknowledged writes verified")


def test_2012_scenario_killed_after_pausing_a_guest_about_to_power_off(guest, bc: Blockcopy,
                                                                       tmp_path: Path) -> None:
    vm = guest(1, poweroff_after=3000)
    bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
    dest = tmp_path / "dest.qcow2"
    job = bc.ok("copy", "vm", "vda", str(dest), "--wait", "--json").json
    crashed = bc("pivot", job["id"], crash_at="qmp:stop")
    assert crashed.returncode == -signal.SIGKILL
    assert vm.acklog.powered_off_after is None, "the guest powered off before the pause: test too slow"
    frozen = vm.acklog.count()
    time.sleep(1.0)
    assert vm.alive() and vm.run_state() == "paused", "a paused guest cannot power off: QEMU stays"
    assert vm.acklog.count() == frozen
    recovered = bc.ok("recover", "--json").json
    assert recovered[0]["outcome"] == "pivoted" and recovered[0]["authoritative"] == "destination"
    assert vm.wait_exit(timeout=300) == 0  # resumed, wrote on, powered itself off; QEMU exited
    assert vm.acklog.powered_off_after == 3000
    status = bc.ok("status", job["id"], "--json").json
    assert status["outcome"] == "pivoted" and status["authoritative"] == "destination"
    result = verify(str(dest), "qcow2", vm.acklog.acks, 0, vm.run_id)
    assert result.checked > 0 and not result.problems, result.problems[:5]
    assert vm.acklog.acks[-1].seq == 3000


@pytest.mark.parametrize(("point", "after"), [("qmp:stop", "alive"), ("qmp:job-complete", "kill"),
                                             ("qmp:job-finalize", "alive"), ("journal:settling@1", "alive"),
                                             ("journal:settling@1", "kill")])
def test_crash_mid_pivot_with_the_guest_writing(guest, bc: Blockcopy, tmp_path: Path, point: str,
                                                after: str) -> None:
    """blockcopy killed at several points of the pivot while a real guest writes; then QEMU lives on
    (recover finishes the pivot and the guest writes on) or is killed (the journal names the image).
    Every acknowledged write must be on the image(s) the journal names."""
    vm = guest(1)
    bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
    dest = tmp_path / "dest.qcow2"
    job = bc.ok("copy", "vm", "vda", str(dest), "--wait", "--json").json
    assert bc("pivot", job["id"], crash_at=point).returncode == -signal.SIGKILL
    assert vm.run_state() == "paused", "blockcopy had paused the guest: it stays paused"
    if after == "kill":
        vm.kill()
    done = bc.ok("recover", "--json").json[0]
    expected = {("pivoted", "destination")} if after == "alive" or point.startswith("journal:settling") else {
        ("not-pivoted", "both"), ("not-pivoted", "source")}
    assert (done["outcome"], done["authoritative"]) in expected, done
    if after == "alive":
        assert vm.run_state() == "running" and vm.device_node("vda")[1] == str(dest)
        at = vm.acklog.count()
        vm.acklog.wait_for(at + 100)  # writes on after recovery
        vm.cmd("stop")  # flushes, so the image file shows them
        time.sleep(0.2)
    images = {"destination": [str(dest)], "source": [vm.disks[0].path],
              "both": [vm.disks[0].path, str(dest)]}[done["authoritative"]]
    for image in images:
        result = verify(image, "qcow2", list(vm.acklog.acks), 0, vm.run_id)
        assert result.checked > 0 and not result.problems, (image, result.problems[:5])


def test_guest_powers_off_during_the_copy(guest, bc: Blockcopy, tmp_path: Path) -> None:
    vm = guest(1, size=64 * MIB, poweroff_after=400, sync=True)
    bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
    job = bc.ok("copy", "vm", "vda", str(tmp_path / "dest.qcow2"), "--bandwidth", "1", "--json").json
    assert vm.wait_exit(timeout=300) == 0
    assert vm.acklog.powered_off_after == 400
    status = bc.ok("status", job["id"], "--json").json
    assert status["outcome"] == "not-pivoted" and status["authoritative"] == "source"
    assert "QEMU exited while copying" in status["reason"]
    result = verify(vm.disks[0].path, "qcow2", vm.acklog.acks, 0, vm.run_id)
    assert result.checked > 0 and not result.problems, result.problems[:5]


def test_write_blocking_converges_under_load_and_background_is_reported(guest, bc: Blockcopy,
                                                                          tmp_path: Path, report: Any) -> None:
    figures = {}
    for mode in ("write-blocking", "background"):
        vm = guest(1, size=32 * MIB, interval_us=0, name=f"g-{mode}")
        state = Blockcopy(tmp_path / f"state-{mode}")
        state.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
        started = time.monotonic()
        proc = state.spawn("copy", "vm", "vda", str(tmp_path / f"{mode}.qcow2"), "--mode", mode,
                           "--bandwidth", "8", "--wait", "--json")
        try:
            proc.wait(timeout=90 if mode == "write-blocking" else 30)
            figures[mode] = f"ready after {time.monotonic() - started:.1f} s"
            assert proc.returncode == 0
        except Exception:
            proc.kill()
            proc.wait()
            if mode == "write-blocking":
                raise
            figures[mode] = "not ready after 30 s"
        writes = vm.acklog.count()
        vm.kill()
        figures[mode] += f" ({writes} guest writes meanwhile)"
    assert figures["write-blocking"].startswith("ready")
    report("guest", f"time to ready at 8 MiB/s with the guest writing flat out: write-blocking "
                         f"{figures['write-blocking']}, background {figures['background']}")
