"""The safety promise under attack (issue 9): each test breaks one way the README's guarantees used
to fail, against real QEMU, with faults injected at deterministic points (``faults.py``)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    MIB,
    Blockcopy,
    guest_reads,
    has_pattern,
    migration_that_runs,
    node_names,
    process_state,
    qemu_jobs,
    wait_for,
)

from blockcopy import CopyRequest, Manager
from blockcopy.errors import Interrupted
from blockcopy.vm import DiskSpec, ScratchVM, fill_pattern, make_image


def _stopped(proc: subprocess.Popen[str]) -> None:
    """Wait until a blockcopy process has SIGSTOPped itself at its fault point."""
    wait_for(lambda: proc.poll() is not None or process_state(proc.pid) == "T", timeout=120,
             what="blockcopy to reach its fault point")
    assert proc.poll() is None, proc.communicate()


_SPAWNED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_process_left_stopped() -> Iterator[None]:
    """A blockcopy left SIGSTOPped by a failing test would hold its domain's lock and QMP socket."""
    yield
    while _SPAWNED:
        proc = _SPAWNED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _spawn(bc: Blockcopy, *args: str, fault: str, serial: bool = True) -> subprocess.Popen[str]:
    """``serial`` False: the batches go as without a fault (BLOCKCOPY_FAULT_SERIAL=0)."""
    env = {**bc.env, "BLOCKCOPY_FAULT_AT": fault, "BLOCKCOPY_FAULT_SERIAL": "1" if serial else "0"}
    proc = subprocess.Popen(bc.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _SPAWNED.append(proc)
    return proc


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


# --- 1. --shallow --reuse-external keeps the backing chain --------------------------------------


def _backed_vm(vm_factory, tmp_path: Path) -> tuple[ScratchVM, Path]:
    base = make_image(tmp_path / "base.qcow2", 64 * MIB)
    fill_pattern(base, "qcow2", 0x0B, 0, 8 * MIB)  # data that lives only in the base
    top = make_image(tmp_path / "top.qcow2", 64 * MIB, backing=base)
    fill_pattern(top, "qcow2", 0x0C, 16 * MIB, MIB)
    return vm_factory([DiskSpec("vda", str(top))]), base


def test_shallow_reuse_external_destination_keeps_the_guests_base_data(vm_factory, bc: Blockcopy,
                                                                         tmp_path: Path) -> None:
    vm, base = _backed_vm(vm_factory, tmp_path)
    bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
    dest = tmp_path / "prepared.qcow2"
    make_image(dest, 64 * MIB, backing=base)  # as a management app pre-creates it
    result = bc.ok("copy", "vm", "vda", str(dest), "--shallow", "--reuse-external", "--pivot", "--json").json
    assert result["outcome"] == "pivoted"
    # Read through the device, as the guest reads: the base's data must still be there.
    assert guest_reads(vm, "vda", 0x0B, 0, 8 * MIB), "the guest lost the data that lives in the base image"
    assert vm.device_node("vda")[1] == str(dest)
    assert guest_reads(vm, "vda", 0x0C, 16 * MIB, MIB)
    vm.write_marker("vda", 0x0D, 4 * MIB)  # copy-on-write of a base cluster keeps the rest of it
    assert guest_reads(vm, "vda", 0x0B, 4 * MIB + 64 * 1024, 64 * 1024)
    assert guest_reads(vm, "vda", 0x0D, 4 * MIB)


@pytest.mark.parametrize("backing", ["none", "other"])
def test_shallow_reuse_external_refuses_a_destination_with_another_base(vm_factory, bc: Blockcopy, tmp_path: Path,
                                                                         backing: str) -> None:
    vm, _base = _backed_vm(vm_factory, tmp_path)
    bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
    dest = tmp_path / "prepared.qcow2"
    other = make_image(tmp_path / "other-base.qcow2", 64 * MIB)
    make_image(dest, 64 * MIB, backing=other if backing == "other" else None)
    before = dest.read_bytes()
    result = bc("copy", "vm", "vda", str(dest), "--shallow", "--reuse-external", "--pivot")
    assert result.returncode == 2
    assert ("has no backing file" if backing == "none" else "must be the same image") in result.stderr
    assert dest.read_bytes() == before and qemu_jobs(vm) == [] and bc.ok("jobs", "--json").json == []


def test_shallow_reuse_external_refuses_a_destination_with_data_of_its_own(vm_factory, bc: Blockcopy,
                                                                          tmp_path: Path) -> None:
    """A shallow mirror (QEMU 7.2: sync top) writes only what the source's top layer holds and does
    not clear its target: a prepared DEST with clusters of its own (one left by another VM over the
    same shared base) would show them to this guest wherever its own top layer holds nothing
    (review 39: the guest read 0xee where its base holds 0x0b, on the code before)."""
    vm, base = _backed_vm(vm_factory, tmp_path)
    bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
    dest = tmp_path / "prepared.qcow2"
    make_image(dest, 64 * MIB, backing=base)
    written = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xee 0 1M", str(dest)], capture_output=True,
                             text=True, check=False)
    assert written.returncode == 0, written.stderr
    before = dest.read_bytes()
    result = bc("copy", "vm", "vda", str(dest), "--shallow", "--reuse-external", "--pivot")
    assert result.returncode == 2 and "holds clusters of its own" in result.stderr, result.stderr
    assert dest.read_bytes() == before and qemu_jobs(vm) == [] and bc.ok("jobs", "--json").json == []
    assert guest_reads(vm, "vda", 0x0B, 0, MIB)


def test_shallow_reuse_external_onto_a_qcow2_overlay_on_a_block_device(vm_factory, bc: Blockcopy,
                                                                      tmp_path: Path) -> None:
    """oVirt's way: a qcow2 overlay on a logical volume (a loop device here), over the same base.
    The check that DEST's own layer is empty must read a block device (review 40: it opened it
    with QEMU's `file` driver, which refuses one, and every such copy was refused)."""
    vm, base = _backed_vm(vm_factory, tmp_path)
    bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
    backing_file = tmp_path / "lv.img"
    with open(backing_file, "wb") as f:
        f.truncate(80 * MIB)
    device = subprocess.run(["losetup", "--find", "--show", str(backing_file)], check=True, capture_output=True,
                            text=True).stdout.strip()
    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", device,
                        str(64 * MIB)], check=True)
        result = bc.ok("copy", "vm", "vda", device, "--shallow", "--reuse-external", "--pivot", "--json").json
        assert result["outcome"] == "pivoted"
        assert guest_reads(vm, "vda", 0x0B, 0, 8 * MIB) and guest_reads(vm, "vda", 0x0C, 16 * MIB, MIB)
    finally:
        vm.kill()
        subprocess.run(["losetup", "-d", device], check=False)


def test_reuse_external_refuses_a_qcow2_destination_with_an_external_data_file(attached, bc: Blockcopy,
                                                                               tmp_path: Path) -> None:
    """A qcow2 header can name an external data file, which QEMU opens by that path, read-write,
    past every check blockcopy makes on DEST itself: a full copy would write the guest's disk over
    whatever file the header names (review 39: it did, on the code before)."""
    attached(1)
    victim = tmp_path / "victim.raw"
    dest = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={victim}", str(dest), str(64 * MIB)],
                   check=True)
    victim.write_bytes(b"\x5c" * (64 * MIB))  # (after: qemu-img create made it empty)
    result = bc("copy", "vm", "vda", str(dest), "--reuse-external", "--pivot")
    assert result.returncode == 2 and "external data file" in result.stderr, result.stderr
    assert victim.read_bytes() == b"\x5c" * (64 * MIB)


# --- the review's data loss: QEMU gone after job-finalize, the guest resumed by someone else -----


@pytest.mark.parametrize("death", ["kill", "quit"])
def test_qemu_gone_after_finalize_with_a_guest_someone_resumed_names_no_wrong_image(attached, bc: Blockcopy,
                                                                                    tmp_path: Path, death: str) -> None:
    vm = attached(1)
    vm.cmd("stop")  # the user paused the guest: blockcopy does not pause (nor resume) it
    dest = tmp_path / "d.qcow2"
    crashed = bc("copy", "vm", "vda", str(dest), "--pivot", crash_at="qmp:job-finalize")
    assert crashed.returncode == -signal.SIGKILL
    vm.cmd("cont")  # the user resumes it, as is their right; the guest writes, to DEST now
    vm.write_marker("vda", 0x6E, 12 * MIB)
    assert has_pattern(dest, 0x6E, 12 * MIB) and not has_pattern(vm.disks[0].path, 0x6E, 12 * MIB)
    if death == "kill":
        vm.kill()
    else:
        vm.quit()
    result = bc("recover", "--json")
    assert result.returncode in (0, 7), result.stderr
    job = result.json[0]
    # The source does not hold that acknowledged write: it must not be named as the image to boot.
    assert job["authoritative"] not in ("source", "both"), job
    assert job["authoritative"] in ("unknown", "destination")
    if job["authoritative"] == "unknown":
        assert job["outcome"] == "failed" and "cannot tell" in job["reason"]


# --- 2. a finish that does not come about is never recorded as a consistent copy ---------------


def test_a_finish_that_cannot_converge_in_time_is_cancelled_and_not_called_consistent(
        attached, bc: Blockcopy, served_file) -> None:
    vm = attached(1, size=16 * MIB)
    target = served_file(16 * MIB)
    job = bc.ok("copy", "vm", "vda", str(target.path), "--format", "raw", "--reuse-external", "--mode",
                "background", "--buf-size", "64K", "--wait", "--json").json
    target.throttle(512 * 1024)  # the destination's storage slows down
    for i in range(4):  # dirty data that the mirror needs seconds to bring over before it can end
        vm.write_marker("vda", 0x50 + i, 8 * MIB + i * MIB, MIB)
    result = bc("--transition-timeout", "1", "finish", job["id"], "--json")
    assert result.returncode == 0, result.stderr
    done = result.json
    assert done["outcome"] == "not-pivoted" and done["authoritative"] == "source"
    assert "NOT a consistent copy" in done["reason"] and [d["consistent"] for d in done["disks"]] == [False]
    # Done means done: nothing of the job is left in QEMU.
    assert done["state"] == "concluded" and qemu_jobs(vm) == []
    assert not {n for n in node_names(vm) if n.startswith("bc-")}
    assert vm.device_node("vda")[1] == vm.disks[0].path and vm.run_state() == "running"
    assert has_pattern(vm.disks[0].path, 0x53, 11 * MIB, MIB)


def test_a_finish_on_storage_that_hangs_stays_unfinished_until_it_answers(attached, bc: Blockcopy,
                                                                         served_file) -> None:
    vm = attached(1, size=16 * MIB)
    target = served_file(16 * MIB)
    job = bc.ok("copy", "vm", "vda", str(target.path), "--format", "raw", "--reuse-external", "--wait",
                "--json").json
    target.hang()
    # A guest write: write-blocking mode sends it to the destination too, where it hangs in flight.
    vm.qemu_io("vda", "aio_write -P 0x52 8M 1M")
    result = bc("--qmp-timeout", "2", "--transition-timeout", "2", "finish", job["id"])
    # The mirror cannot end while a write to DEST hangs, even cancelled: nothing may be claimed.
    assert result.returncode in (4, 10), result.stderr
    assert "blockcopy recover" in result.stderr and "Traceback" not in result.stderr
    # QEMU hangs in its main loop as it cancels a mirror whose target hangs (its own gitlab #462),
    # sometimes before the finish could even connect: either way the job stays unfinished.
    status = bc.ok("--transition-timeout", "2", "--qmp-timeout", "2", "jobs", "--json").json[0]
    assert status["outcome"] is None and status["state"] in ("finishing", "running", "ready")
    assert [d["consistent"] for d in status["disks"]] != [True]
    target.resume()  # the storage answers again: the next command finishes the job
    recovered = bc.ok("recover", "--json").json
    assert len(recovered) == 1
    done = recovered[0] if recovered[0]["outcome"] else bc.ok("finish", job["id"], "--json").json
    assert done["outcome"] == "not-pivoted" and done["authoritative"] == "source"
    consistent = done["disks"][0]["consistent"]
    assert ("NOT a consistent copy" in done["reason"]) is (consistent is False), done
    assert done["state"] == "concluded" and qemu_jobs(vm) == [], done
    assert not {n for n in node_names(vm) if n.startswith("bc-")}, (done["reason"], done["warnings"], done["disks"])
    assert vm.device_node("vda")[1] == vm.disks[0].path and vm.run_state() == "running"
    vm.qemu_io("vda", "aio_flush")
    vm.qemu_io("vda", "flush")
    assert has_pattern(vm.disks[0].path, 0x52, 8 * MIB, MIB)


def test_a_finish_that_converges_claims_a_consistent_copy(attached, bc: Blockcopy, tmp_path: Path) -> None:
    attached(1)
    done = bc.ok("copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--finish", "--json").json
    assert done["outcome"] == "not-pivoted" and [d["consistent"] for d in done["disks"]] == [True]
    assert "destination is a consistent copy" in done["reason"]


# --- 3. the pivot's time limit covers only the wait for 'pending' -------------------------------


def test_a_slow_step_before_the_wait_does_not_count_against_the_pivot(attached, bc: Blockcopy,
                                                                       tmp_path: Path) -> None:
    vm = attached(1)
    env = {**bc.env, "BLOCKCOPY_FAULT_AT": "sync-images=sleep:2.5"}  # a slow fsync before `stop`
    proc = subprocess.run(bc.argv("--transition-timeout", "1", "copy", "vm", "vda", str(tmp_path / "d.qcow2"),
                                  "--pivot", "--json"), capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert '"outcome": "pivoted"' in proc.stdout
    assert vm.device_node("vda")[1] == str(tmp_path / "d.qcow2") and vm.run_state() == "running"


# --- 4. errors inside the pause: said plainly, guest paused only while the outcome is unknown ---


def test_a_full_journal_during_the_pivot_keeps_the_guest_paused_and_says_so(vm_factory, tmp_path: Path,
                                                                            tmpfs) -> None:
    state = tmpfs("2m")
    bc = Blockcopy(state)
    vm = vm_factory(1, size=16 * MIB)
    bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
    vm.write_marker("vda", 0x61, 8 * MIB)
    dest = tmp_path / "d.qcow2"
    job = bc.ok("copy", "vm", "vda", str(dest), "--wait", "--json").json
    proc = _spawn(bc, "pivot", job["id"], fault="qmp:job-complete=stop")  # the guest is paused now
    _stopped(proc)
    filler = state / "filler"
    with open(filler, "wb") as out:  # the journal's file system fills up
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    os.kill(proc.pid, signal.SIGCONT)
    code, _out, err = _finish(proc)
    assert code == 9, err
    assert "stays PAUSED" in err and "domain vm" in err and job["id"] in err and "blockcopy recover" in err
    assert "Traceback" not in err
    assert vm.run_state() == "paused", "the guest must not run before the outcome is journaled"
    filler.unlink()
    recovered = bc.ok("recover", "--json").json
    assert [(j["outcome"], j["authoritative"]) for j in recovered] == [("pivoted", "destination")]
    assert vm.run_state() == "running" and vm.device_node("vda")[1] == str(dest)
    assert has_pattern(dest, 0x61, 8 * MIB) and qemu_jobs(vm) == []


def test_qemu_that_stops_answering_mid_pivot_for_a_while_is_waited_for(attached, bc: Blockcopy,
                                                                       tmp_path: Path) -> None:
    vm = attached(1)
    dest = tmp_path / "d.qcow2"
    job = bc.ok("copy", "vm", "vda", str(dest), "--wait", "--json").json
    proc = _spawn(bc, "--qmp-timeout", "1", "--transition-timeout", "20", "pivot", job["id"],
                  fault="qmp:job-complete=stop")
    _stopped(proc)
    os.kill(vm.process.pid, signal.SIGSTOP)  # QEMU hangs: no QMP answers
    os.kill(proc.pid, signal.SIGCONT)
    time.sleep(4)  # several command timeouts
    assert proc.poll() is None, "blockcopy gave up although the time limit was not reached"
    os.kill(vm.process.pid, signal.SIGCONT)
    code, out, err = _finish(proc)
    assert code == 0, err
    assert '"outcome": "pivoted"' in out or "pivoted" in out
    assert vm.run_state() == "running" and vm.device_node("vda")[1] == str(dest)


def test_qemu_silent_past_the_time_limit_ends_the_command_clearly_and_recover_finishes(attached, bc: Blockcopy,
                                                                                       tmp_path: Path) -> None:
    vm = attached(1)
    dest = tmp_path / "d.qcow2"
    job = bc.ok("copy", "vm", "vda", str(dest), "--wait", "--json").json
    proc = _spawn(bc, "--qmp-timeout", "1", "--transition-timeout", "3", "pivot", job["id"],
                  fault="qmp:job-complete=stop")
    _stopped(proc)
    os.kill(vm.process.pid, signal.SIGSTOP)
    try:
        os.kill(proc.pid, signal.SIGCONT)
        code, _out, err = _finish(proc)
    finally:
        os.kill(vm.process.pid, signal.SIGCONT)
    assert code == 9, err
    assert "stays PAUSED" in err and job["id"] in err and "blockcopy recover" in err and "Traceback" not in err
    recovered = bc.ok("recover", "--json").json
    assert [(j["outcome"], j["authoritative"]) for j in recovered] == [("pivoted", "destination")]
    assert vm.run_state() == "running" and vm.device_node("vda")[1] == str(dest) and qemu_jobs(vm) == []


# --- 5. "QEMU is gone" means the QEMU process is gone ------------------------------------------


def test_a_removed_socket_in_front_of_a_running_qemu_decides_nothing(attached, bc: Blockcopy, tmp_path: Path) -> None:
    vm = attached(1)
    job = bc.ok("copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--bandwidth", "1", "--json").json
    vm.qmp_socket.unlink()  # someone removed the socket file; QEMU runs on, and so does the copy
    result = bc("--transition-timeout", "1", "recover", "--json")
    assert result.returncode == 8, result.stderr
    assert "still runs" in result.stderr and f"pid {vm.process.pid}" in result.stderr
    # (status too cannot reach that QEMU: it shows the journal once its time limit has passed)
    status = bc.ok("--transition-timeout", "1", "status", job["id"], "--json").json
    assert status["outcome"] is None and status["state"] != "concluded"
    assert [j["status"] for j in qemu_jobs(vm)] in (["running"], ["ready"])


def test_a_guest_paused_mid_pivot_behind_a_removed_socket_is_not_declared_gone(attached, bc: Blockcopy,
                                                                              tmp_path: Path) -> None:
    vm = attached(1)
    crashed = bc("copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--pivot", crash_at="qmp:stop")
    assert crashed.returncode == -signal.SIGKILL
    vm.qmp_socket.unlink()
    result = bc("--transition-timeout", "1", "recover")
    assert result.returncode == 9 and "stays PAUSED" in result.stderr and "still runs" in result.stderr
    job = bc.ok("--transition-timeout", "1", "jobs", "--json").json[0]
    assert job["outcome"] is None and vm.run_state() == "paused" and len(qemu_jobs(vm)) == 1


def test_a_guest_paused_mid_pivot_behind_a_busy_socket_is_said_to_stay_paused(attached, bc: Blockcopy,
                                                                              tmp_path: Path) -> None:
    vm = attached(1)
    crashed = bc("copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--pivot", crash_at="qmp:stop")
    assert crashed.returncode == -signal.SIGKILL
    holder = socket.socket(socket.AF_UNIX)
    holder.connect(str(vm.qmp_socket))  # another client holds blockcopy's QMP socket
    try:
        holder.recv(4096)
        result = bc("--transition-timeout", "1", "recover")
    finally:
        holder.close()
    assert result.returncode == 9 and "stays PAUSED" in result.stderr, result.stderr
    assert vm.run_state() == "paused"
    job = bc.ok("recover", "--json").json[0]  # once the socket is free
    assert job["outcome"] == "pivoted" and vm.run_state() == "running"


def test_a_copy_is_refused_where_qemus_process_cannot_be_seen(attached, bc: Blockcopy, tmp_path: Path) -> None:
    """From another PID namespace the kernel names no peer process: blockcopy could not tell later
    whether QEMU exited, so it starts nothing."""
    vm = attached(1)
    argv = ["unshare", "--pid", "--fork", "--mount-proc", *bc.argv("copy", "vm", "vda", str(tmp_path / "d.qcow2"))]
    result = subprocess.run(argv, capture_output=True, text=True, env=bc.env, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert "cannot tell which process serves the QMP socket" in result.stderr
    assert qemu_jobs(vm) == [] and not (tmp_path / "d.qcow2").exists()


@pytest.mark.parametrize("command", ["status", "recover"])
def test_where_qemus_process_cannot_be_seen_nothing_is_declared_gone(attached, bc: Blockcopy, tmp_path: Path,
                                                                     command: str) -> None:
    vm = attached(1)
    crashed = bc("copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--pivot", crash_at="qmp:job-complete")
    assert crashed.returncode == -signal.SIGKILL and vm.run_state() == "paused"
    # `jobs`/`status` here would reconcile from this namespace: read the id from the journal itself.
    args = ["status", _only_job_id(bc), "--json"] if command == "status" else ["recover"]
    argv = ["unshare", "--pid", "--fork", "--mount-proc", *bc.argv("--transition-timeout", "1", *args)]
    result = subprocess.run(argv, capture_output=True, text=True, env=bc.env, timeout=120, check=False)
    assert "cannot tell whether QEMU" in result.stderr, result.stderr
    if command == "recover":
        assert result.returncode == 9 and "stays PAUSED" in result.stderr
    # Nothing was decided from there: back where QEMU's process is visible, recovery goes on.
    assert vm.run_state() == "paused" and len(qemu_jobs(vm)) == 1
    done = bc.ok("recover", "--json").json[0]
    assert done["outcome"] == "pivoted" and vm.run_state() == "running"


def _only_job_id(bc: Blockcopy) -> str:
    from blockcopy.journal import Journal

    journal = Journal(bc.state_dir, create=False)
    try:
        return journal.operations()[0].id
    finally:
        journal.close()


@pytest.mark.parametrize("command", ["finish", "abort"])
def test_finish_and_abort_of_a_paused_guest_end(attached, bc: Blockcopy, tmp_path: Path, command: str) -> None:
    """fd sets of a paused guest stay listed after remove-fd: the cleanup must end anyway."""
    vm = attached(1, size=16 * MIB)
    job = bc.ok("copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--wait", "--json").json
    vm.cmd("stop")
    done = bc.ok(command, job["id"], "--json", timeout=60).json
    assert done["state"] == "concluded" and done["outcome"] == "not-pivoted"
    assert vm.run_state() == "paused" and qemu_jobs(vm) == []


def test_another_qemu_on_the_same_socket_path_is_not_the_jobs_qemu(vm_factory, bc: Blockcopy, tmp_path: Path) -> None:
    vm = vm_factory(1, size=16 * MIB)
    bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
    vm.write_marker("vda", 0x62, 8 * MIB)
    dest = tmp_path / "d.qcow2"
    crashed = bc("copy", "vm", "vda", str(dest), "--pivot", crash_at="qmp:stop")
    assert crashed.returncode == -signal.SIGKILL
    vm.kill()
    other_image = make_image(tmp_path / "other.qcow2", 16 * MIB)
    other = ScratchVM(tmp_path, [DiskSpec("vda", str(other_image))], name="vm", accel=vm.accel)  # same socket path
    try:
        assert other.qmp_socket == vm.qmp_socket
        job = bc.ok("recover", "--json").json[0]
        assert job["outcome"] == "not-pivoted" and "QEMU exited during the pivot" in job["reason"]
        assert job["authoritative"] in ("source", "both")
        # The new QEMU was not touched: its disk, its nodes and its run state are its own.
        assert other.device_node("vda") == ("vda-fmt", str(other_image))
        assert "vda-fmt" in node_names(other) and other.run_state() == "running" and qemu_jobs(other) == []
        assert has_pattern(vm.disks[0].path, 0x62, 8 * MIB)
        # New jobs run in the new QEMU.
        bc.ok("copy", "vm", "vda", str(tmp_path / "d2.qcow2"), "--pivot")
        assert other.device_node("vda")[1] == str(tmp_path / "d2.qcow2")
    finally:
        other.kill()


# --- 6. destination creation without a symlink race; recovery knows its own file ----------------


def _victim(tmp_path: Path) -> tuple[Path, bytes]:
    victim = make_image(tmp_path / "another-vms-disk.qcow2", 64 * MIB)
    fill_pattern(victim, "qcow2", 0x77, 0, 8 * MIB)
    return victim, victim.read_bytes()


@pytest.mark.parametrize("point", ["journal:starting@2", "create-image@1", "journal:starting@3"])
def test_a_symlink_swapped_in_for_the_destination_is_never_written_through(attached, bc: Blockcopy, tmp_path: Path,
                                                                           point: str) -> None:
    vm = attached(1)
    victim, before = _victim(tmp_path)
    dest = tmp_path / "d.qcow2"
    proc = _spawn(bc, "copy", "vm", "vda", str(dest), "--pivot", fault=f"{point}=stop")
    _stopped(proc)
    if dest.exists():
        dest.unlink()
    dest.symlink_to(victim)  # someone who can write the directory swaps in a symlink
    os.kill(proc.pid, signal.SIGCONT)
    code, _out, err = _finish(proc)
    assert code == 7, err
    job = bc.ok("jobs", "--json").json[0]
    assert job["outcome"] == "failed" and job["authoritative"] == "source"
    assert victim.read_bytes() == before, "blockcopy wrote through the swapped-in symlink"
    assert dest.is_symlink()
    assert vm.device_node("vda")[1] == vm.disks[0].path and qemu_jobs(vm) == []
    assert not {n for n in node_names(vm) if n.startswith("bc-")}


def test_a_directory_swapped_in_for_the_destinations_is_never_written_into(attached, bc: Blockcopy,
                                                                            tmp_path: Path) -> None:
    vm = attached(1)
    tenant, elsewhere = tmp_path / "tenant", tmp_path / "root-only"
    tenant.mkdir()
    elsewhere.mkdir(mode=0o700)
    proc = _spawn(bc, "copy", "vm", "vda", str(tenant / "d.qcow2"), "--pivot", fault="journal:starting@1=stop")
    _stopped(proc)
    tenant.rename(tmp_path / "tenant-moved")
    tenant.symlink_to(elsewhere)  # the tenant's directory is now a symlink to somewhere else
    os.kill(proc.pid, signal.SIGCONT)
    code, _out, err = _finish(proc)
    assert code == 7, err
    job = bc.ok("jobs", "--json").json[0]
    assert job["outcome"] == "failed" and "not the one checked" in job["error"]
    assert list(elsewhere.iterdir()) == [], "DEST was created in the swapped-in directory"
    assert vm.device_node("vda")[1] == vm.disks[0].path and qemu_jobs(vm) == []


def test_a_kill_right_after_creating_the_destination_still_pivots_after_recover(attached, bc: Blockcopy,
                                                                                tmp_path: Path) -> None:
    vm = attached(1)
    dest = tmp_path / "d.qcow2"
    crashed = bc("copy", "vm", "vda", str(dest), "--pivot", crash_at="create-image")
    assert crashed.returncode == -signal.SIGKILL and dest.exists()
    job = bc.ok("recover", "--json").json[0]
    assert (job["outcome"], job["authoritative"]) == ("pivoted", "destination")
    assert job["disks"][0]["destination_created"] is True
    assert vm.device_node("vda")[1] == str(dest)


def test_without_o_tmpfile_a_crash_before_linking_still_pivots_and_leaves_no_file(attached, bc: Blockcopy,
                                                                                  tmp_path: Path) -> None:
    """On file systems without O_TMPFILE (NFS, CIFS) the image is made under a name of the job's own;
    a crash before it is linked into place leaves that name, which the next run reuses."""
    vm = attached(1)
    dest = tmp_path / "d.qcow2"
    env = {**bc.env, "BLOCKCOPY_FAULT_AT": "o-tmpfile=fail,journal:starting@2=kill"}
    crashed = subprocess.run(bc.argv("copy", "vm", "vda", str(dest), "--pivot"), capture_output=True, text=True,
                             env=env, timeout=120, check=False)
    assert crashed.returncode == -signal.SIGKILL
    assert [p.name for p in tmp_path.glob(".d.qcow2.blockcopy-*")], "the temporary name is there"
    bc.env["BLOCKCOPY_FAULT_AT"] = "o-tmpfile=fail"
    job = bc.ok("recover", "--json").json[0]
    assert (job["outcome"], job["authoritative"]) == ("pivoted", "destination")
    assert vm.device_node("vda")[1] == str(dest)
    assert not list(tmp_path.glob(".d.qcow2.blockcopy-*")), "temporary file left behind"


def test_without_o_tmpfile_a_crash_between_link_and_unlink_leaves_no_second_name(attached, bc: Blockcopy,
                                                                                  tmp_path: Path) -> None:
    attached(1)
    dest = tmp_path / "d.qcow2"
    env = {**bc.env, "BLOCKCOPY_FAULT_AT": "o-tmpfile=fail,create-image=kill"}
    crashed = subprocess.run(bc.argv("copy", "vm", "vda", str(dest), "--pivot"), capture_output=True, text=True,
                             env=env, timeout=120, check=False)
    assert crashed.returncode == -signal.SIGKILL and dest.exists()
    job = bc.ok("recover", "--json").json[0]
    assert job["outcome"] == "pivoted"
    assert dest.stat().st_nlink == 1 and not list(tmp_path.glob(".d.qcow2.blockcopy-*"))


# --- 7. recover never keeps a guest paused while another job copies -----------------------------


def test_recover_resumes_a_paused_guest_before_waiting_for_another_jobs_copy(attached, bc: Blockcopy,
                                                                             tmp_path: Path) -> None:
    vm = attached(2, size=16 * MIB)
    slow = bc.spawn("copy", "vm", "vda", str(tmp_path / "a.qcow2"), "--pivot", "--bandwidth", "1")
    wait_for(lambda: any(j["status"] == "running" for j in qemu_jobs(vm)), what="the slow mirror to run")
    slow.send_signal(signal.SIGKILL)
    slow.wait(timeout=30)
    slow_id = qemu_jobs(vm)[0]["id"]
    crashed = bc("copy", "vm", "vdb", str(tmp_path / "b.qcow2"), "--pivot", crash_at="qmp:stop")
    assert crashed.returncode == -signal.SIGKILL and vm.run_state() == "paused"
    recover = bc.spawn("recover", "--json")
    wait_for(lambda: vm.run_state() == "running", timeout=60, what="the guest to be resumed")
    slow_job = next(j for j in qemu_jobs(vm) if j["id"] == slow_id)
    assert slow_job["status"] == "running", "the guest stayed paused while another job copied"
    out, err = recover.communicate(timeout=180)
    assert recover.returncode == 0, err
    assert sorted(j["outcome"] for j in json.loads(out)) == ["pivoted", "pivoted"], out


# --- 8. smaller holes ------------------------------------------------------------------------------


def test_no_finalize_after_someone_else_resumed_the_guest(attached, bc: Blockcopy, tmp_path: Path) -> None:
    vm = attached(1)
    vm.write_marker("vda", 0x63, 8 * MIB)
    dest = tmp_path / "d.qcow2"
    job = bc.ok("copy", "vm", "vda", str(dest), "--wait", "--json").json
    proc = _spawn(bc, "pivot", job["id"], fault="qmp:job-complete=stop")
    _stopped(proc)
    wait_for(lambda: [j["status"] for j in qemu_jobs(vm)] == ["pending"], what="the job to be pending")
    vm.cmd("cont")  # another tool resumes the guest in the middle of the pivot
    os.kill(proc.pid, signal.SIGCONT)
    code, _out, err = _finish(proc)
    assert code == 7, err
    status = bc.ok("status", job["id"], "--json").json
    assert status["outcome"] == "failed" and "resumed by someone else" in status["error"]
    assert vm.device_node("vda")[1] == vm.disks[0].path and vm.run_state() == "running"
    assert has_pattern(vm.disks[0].path, 0x63, 8 * MIB) and qemu_jobs(vm) == []


def test_attach_refuses_to_repoint_a_domain_with_unfinished_jobs(attached, bc: Blockcopy, tmp_path: Path,
                                                                 vm_factory) -> None:
    vm = attached(1)
    other = vm_factory(1, size=16 * MIB, name="other")
    bc.ok("copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--bandwidth", "1")
    result = bc("attach", "vm", "--qmp", str(other.qmp_socket))
    assert result.returncode == 2 and "unfinished jobs" in result.stderr
    assert bc.ok("domains", "--json").json[0]["qmp_socket"] == str(vm.qmp_socket)


def test_attach_and_detach_wait_for_the_domain_lock(attached, bc: Blockcopy, tmp_path: Path) -> None:
    attached(1)
    waiting = bc.spawn("copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--bandwidth", "1", "--wait")
    wait_for(lambda: (bc.state_dir / "locks" / "vm.lock").exists()
             and (bc.state_dir / "locks" / "vm.lock").read_text().strip() == str(waiting.pid), what="the lock")
    try:
        for command in (["attach", "vm", "--qmp", "/nonexistent.qmp"], ["detach", "vm"]):
            result = bc(*command)
            assert result.returncode == 5 and "is busy" in result.stderr, command
    finally:
        waiting.send_signal(signal.SIGINT)
        waiting.wait(timeout=30)


def test_a_symlink_in_place_of_the_lock_file_is_refused_untouched(attached, bc: Blockcopy, tmp_path: Path) -> None:
    attached(1)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    lock = bc.state_dir / "locks" / "vm.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.unlink(missing_ok=True)
    lock.symlink_to(victim)
    result = bc("disks", "vm")
    assert result.returncode != 0 and "lock" in result.stderr and "Traceback" not in result.stderr
    assert victim.read_text() == "precious"


def test_job_ids_are_long_and_found_by_a_unique_prefix(attached, bc: Blockcopy, tmp_path: Path) -> None:
    attached(1)
    job = bc.ok("copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--finish", "--json").json
    assert len(job["id"]) >= 16
    assert bc.ok("status", job["id"][:6], "--json").json["id"] == job["id"]


@pytest.mark.parametrize(("point", "gap"), [("sync-images", 0.0), ("sync-images", 1.5), ("journal:pivoting", 0.0)])
def test_a_guest_paused_by_someone_just_before_the_stop_is_not_resumed(attached, bc: Blockcopy, tmp_path: Path,
                                                                       point: str, gap: float) -> None:
    """The guest is paused by another tool between blockcopy's last look and its `stop` (which then
    emits no STOP event): it is not blockcopy's to resume, and that tool's STOP is not blockcopy's
    pause window. At `journal:pivoting` the pivot has journaled that it will pause the guest and
    not looked again yet: its next look sees the guest paused and sends no `stop` at all (review
    38: the code before resumed the other tool's pause)."""
    vm = attached(1)
    proc = _spawn(bc, "copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--pivot", "--json", fault=f"{point}=stop")
    _stopped(proc)
    vm.cmd("stop")
    time.sleep(gap)
    os.kill(proc.pid, signal.SIGCONT)
    _pivoted_and_left_paused(proc, vm, tmp_path / "d.qcow2")


def _pivoted_and_left_paused(proc: subprocess.Popen[str], vm: ScratchVM, dest: Path) -> dict[str, Any]:
    """The pivot of a guest that another tool paused: done, on DEST, not resumed, and that tool's
    STOP not taken for blockcopy's pause window. The job's view."""
    code, out, err = _finish(proc)
    assert code == 0, err
    job: dict[str, Any] = json.loads(out)
    assert job["outcome"] == "pivoted" and job["paused_by_blockcopy"] is False
    assert job["pause_window_ms"] is None
    assert vm.run_state() == "paused", "blockcopy resumed a guest that someone else had paused"
    assert vm.device_node("vda")[1] == str(dest)
    return job


@pytest.mark.parametrize("behind", [True, False], ids=["completes-behind-stop", "one-at-a-time"])
def test_a_guest_paused_by_someone_between_the_last_look_and_the_stop_is_not_resumed(
        attached, bc: Blockcopy, tmp_path: Path, behind: bool) -> None:
    """Another tool pauses the guest after blockcopy read it running and before its `stop` (which
    then emits no STOP event). With the job-completes written right behind the `stop` (as without
    a fault), they are in QEMU before blockcopy reads whose STOP it was: the guest must still be
    journaled as the other tool's, not resumed, and its STOP not taken for blockcopy's pause."""
    vm = attached(1)
    proc = _spawn(bc, "copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--pivot", "--json", fault="run-state=stop",
                  serial=not behind)
    _stopped(proc)
    assert vm.run_state() == "running", "stopped after reading the guest running, before its `stop`"
    vm.cmd("stop")
    os.kill(proc.pid, signal.SIGCONT)
    job = _pivoted_and_left_paused(proc, vm, tmp_path / "d.qcow2")
    steps = bc.ok("status", job["id"], "--log").stdout
    assert "paused by someone else just before" in steps
    assert any("leaves it paused" in w for w in job["warnings"]), job["warnings"]


def test_reused_raw_destination_is_read_as_raw_not_probed(attached, bc: Blockcopy, tmp_path: Path) -> None:
    """A raw DEST whose bytes happen to start with a qcow2 header (a guest may write one) is used as
    the raw image the user named, not probed into a qcow2 with someone else's backing file."""
    vm = attached(1)
    dest = make_image(tmp_path / "d.raw", 64 * MIB)  # qcow2 bytes ...
    os.truncate(dest, 64 * MIB)  # ... in a file of the disk's size, used as raw
    result = bc.ok("copy", "vm", "vda", str(dest), "--format", "raw", "--reuse-external", "--pivot", "--json").json
    assert result["outcome"] == "pivoted"
    assert has_pattern(dest, 0x11, 0, 4 * MIB, fmt="raw") and vm.device_node("vda")[1] == str(dest)


def test_manager_interrupt_stops_one_wait_only(vm_factory, tmp_path: Path) -> None:
    vm = vm_factory(1, size=16 * MIB)

    async def run() -> None:
        manager = Manager(tmp_path / "state")
        try:
            await manager.attach("vm", str(vm.qmp_socket))
            op = await manager.copy(CopyRequest("vm", [("vda", str(tmp_path / "d.qcow2"))], bandwidth_mib=8))
            manager.interrupt.set()
            with pytest.raises(Interrupted):
                await manager.wait_ready(op.id)
            assert not manager.interrupt.is_set()
            # The next wait is not stopped by the interrupt of the last one: it reaches ready.
            ready = await asyncio.wait_for(manager.wait_ready(op.id), 120)
            assert ready.ready_at is not None and all(d.job_status == "ready" for d in ready.disks)
            await manager.abort(op.id)
        finally:
            manager.close()

    asyncio.run(run())


def test_a_file_that_appears_at_dest_while_it_is_made_aborts_the_copy_cleanly(attached, bc: Blockcopy,
                                                                               tmp_path: Path) -> None:
    """The image's identity is journaled, then linking it fails (someone made DEST meanwhile): the
    step fails with the record that journaled it, so the abort that follows is saved (not refused
    as if another driver had written)."""
    vm = attached(1)
    dest = tmp_path / "d.qcow2"
    proc = _spawn(bc, "copy", "vm", "vda", str(dest), "--pivot", "--json", fault="journal:starting@2=stop")
    wait_for(lambda: process_state(proc.pid) == "T", 60, "the copy to stop after journaling the image")
    dest.write_bytes(b"someone else's file")
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 7, err
    job = json.loads(out)
    assert job["outcome"] == "failed" and "appeared while blockcopy was making it" in job["error"], job
    assert dest.read_bytes() == b"someone else's file"  # left untouched
    assert qemu_jobs(vm) == [] and vm.run_state() == "running"


def _held_by_migration(bc: Blockcopy, job: str, pivot: subprocess.Popen[str]) -> None:
    """Waits until the journal says the pivot waits for a migration (read from the journal, not
    with `status`: without a daemon, a command that holds the job while the pivot starts makes the
    pivot refuse to run, as it should)."""
    from blockcopy.journal import Journal
    from blockcopy.records import Phase

    journal = Journal(bc.state_dir, create=False)
    try:
        def held() -> bool:
            op = journal.get(job)
            return (op is not None and op.phase is Phase.COPYING and "migration" in op.waiting) or \
                pivot.poll() is not None

        wait_for(held, what="the pivot to wait for the migration")
    finally:
        journal.close()
    assert pivot.poll() is None, pivot.communicate()


def test_a_pivot_waits_while_a_migration_runs(attached, bc: Blockcopy, tmp_path: Path) -> None:
    """A migration takes the guest to a QEMU that opens the disks its own command line names: a
    pivot during one would leave every write after it on a DEST the other side never opens. The
    migration here runs until the test cancels it (conftest.migration_that_runs): the
    pivot must wait (no job completed, the device on the source, `status` says why), then pivot
    once it has ended."""
    vm = attached(1)
    job = bc.ok("copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--wait", "--json").json
    pivot: subprocess.Popen[str] | None = None
    with migration_that_runs(vm, tmp_path):
        pivot = subprocess.Popen(bc.argv("pivot", job["id"], "--wait", "--json", "--verbose"), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=bc.env)
        _SPAWNED.append(pivot)
        _held_by_migration(bc, job["id"], pivot)
        assert [j["status"] for j in vm.cmd("query-jobs")] == ["ready"], "no job completed during the migration"
        assert vm.device_node("vda")[1] == vm.disks[0].path and vm.run_state() == "running"
        assert "waiting: the pivot waits for the VM's migration to end" in bc.ok("status", job["id"]).stdout
    code, out, err = _finish(pivot)
    assert code == 0, err
    assert err.count("the pivot waits for the VM's migration to end") == 1, err  # seen, and said once
    done = json.loads(out)
    assert done["outcome"] == "pivoted" and done["paused_by_blockcopy"] is True and done["waiting"] is None, done
    assert vm.device_node("vda")[1] == str(tmp_path / "d.qcow2") and vm.run_state() == "running"


@pytest.mark.parametrize("then", ["qemu-exits", "resumed-here"])
def test_a_vm_migrated_away_is_not_pivoted_unless_its_guest_runs_here_again(
        attached, bc: Blockcopy, tmp_path: Path, then: str) -> None:
    """Once the VM has migrated away, its guest runs elsewhere on the source image (what the other
    QEMU's command line names): a pivot of this QEMU's device would journal DEST as the disk while
    the guest writes the source. The pivot waits. When this QEMU exits (as libvirt ends it after a
    migration) the job ends not pivoted, the source named; when the guest is resumed here instead
    (libvirt does that when the destination fails to take over), the mirror still runs and the
    pivot goes on. On the code before, the pivot journaled "pivoted", DEST authoritative."""
    vm = attached(1)
    job = bc.ok("copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--wait", "--json").json
    vm.cmd("migrate", uri=f"exec:cat > {tmp_path / 'migration'}")
    wait_for(lambda: vm.cmd("query-migrate")["status"] == "completed" and vm.run_state() == "postmigrate",
             what="the migration to end")
    pivot = subprocess.Popen(bc.argv("pivot", job["id"], "--json"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=bc.env)
    _SPAWNED.append(pivot)
    _held_by_migration(bc, job["id"], pivot)
    assert vm.device_node("vda")[1] == vm.disks[0].path
    if then == "qemu-exits":
        vm.kill()
    else:
        vm.cmd("cont")
    code, out, err = _finish(pivot)
    done = json.loads(out)
    if then == "qemu-exits":
        assert code == 0 and done["outcome"] == "not-pivoted" and done["authoritative"] == "source", (done, err)
        assert not any(d["pivoted"] for d in done["disks"]), done
    else:
        assert code == 0 and done["outcome"] == "pivoted" and done["authoritative"] == "destination", (done, err)
        assert vm.device_node("vda")[1] == str(tmp_path / "d.qcow2") and vm.run_state() == "running"
        assert qemu_jobs(vm) == []


def test_a_pivot_waits_for_a_memory_dump_that_holds_the_guest_paused(attached, bc: Blockcopy, tmp_path: Path) -> None:
    """A detached dump-guest-memory pauses the guest itself (run state `save-vm`) and resumes it
    when the dump ends, whenever that is. A pivot begun meanwhile would take that pause for a
    user's, pause nothing itself, and the dump's end could resume the guest between job-finalize and
    the outcome's record. The dump here writes into a FIFO nobody reads, so it lasts until the test
    drains it: the pivot must wait, then pause the guest itself and resume it."""
    vm = attached(1)
    job = bc.ok("copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--wait", "--json").json
    fifo = tmp_path / "dump.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # (QEMU's open for writing then returns at once)
    pivot: subprocess.Popen[str] | None = None
    try:
        vm.cmd("dump-guest-memory", paging=False, protocol=f"file:{fifo}", detach=True)
        assert vm.cmd("query-dump")["status"] == "active" and vm.run_state() == "save-vm"
        pivot = subprocess.Popen(bc.argv("pivot", job["id"], "--wait", "--json", "--verbose"), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=bc.env)
        _SPAWNED.append(pivot)
        time.sleep(2.0)
        assert pivot.poll() is None, pivot.communicate()
        assert [j["status"] for j in vm.cmd("query-jobs")] == ["ready"], "no job completed during the dump"
        assert vm.device_node("vda")[1] != str(tmp_path / "d.qcow2")
        # what holds the pivot is said where users look, not only in the command's --verbose log
        held = bc.ok("status", job["id"], "--json").json
        assert held["phase"] == "copying" and "memory dump" in (held["waiting"] or ""), held
        assert "waiting: the pivot waits for QEMU's memory dump" in bc.ok("status", job["id"]).stdout
    finally:
        os.set_blocking(reader, True)
        while os.read(reader, 1 << 20):  # the dump goes on to its end; QEMU resumes the guest
            pass
        os.close(reader)
    code, out, err = _finish(pivot)
    assert code == 0, err
    assert err.count("the pivot waits for QEMU's memory dump") == 1, err  # seen, and said once
    done = json.loads(out)
    assert done["outcome"] == "pivoted" and done["paused_by_blockcopy"] is True, done
    assert done["waiting"] is None, done
    assert done["pause_window_ms"] is not None and vm.run_state() == "running"
    assert vm.device_node("vda")[1] == str(tmp_path / "d.qcow2")
