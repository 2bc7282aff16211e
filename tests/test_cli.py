"""The command's own behaviour: domains, interruption, legacy -drive VMs, help and JSON."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from conftest import MIB, Blockcopy, has_pattern, interrupt_wait, node_names, qemu_jobs, wait_for

from blockcopy.vm import DiskSpec, ScratchVM, make_image


def test_attach_domains_detach(vm_factory, bc: Blockcopy, tmp_path: Path) -> None:
    vm = vm_factory(1)
    attached = bc.ok("attach", "web1", "--qmp", str(vm.qmp_socket), "--json").json
    assert attached["domain"] == "web1" and attached["qmp_socket"] == str(vm.qmp_socket)
    assert attached["qemu_pid"] == vm.process.pid  # the process that answered, from SO_PEERCRED
    assert [d["domain"] for d in bc.ok("domains", "--json").json] == ["web1"]
    disks = bc.ok("disks", "web1", "--json").json
    assert [(d["disk"], d["node"], d["format"], d["image"], d["virtual_size"]) for d in disks] == [
        ("vda", "vda-fmt", "qcow2", vm.disks[0].path, 64 * MIB)]
    job = bc.ok("copy", "web1", "vda", str(tmp_path / "d.qcow2"), "--bandwidth", "1", "--json").json
    refused = bc("detach", "web1")
    assert refused.returncode == 2 and job["id"] in refused.stderr
    bc.ok("abort", job["id"])
    bc.ok("detach", "web1")
    assert bc.ok("domains", "--json").json == []


def test_ctrl_c_while_waiting_leaves_the_job_copying(attached, bc: Blockcopy, tmp_path: Path) -> None:
    vm = attached(1)
    proc = bc.spawn("copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--pivot", "--bandwidth", "2")
    wait_for(lambda: any(j["status"] == "running" for j in qemu_jobs(vm)), what="the mirror to run")
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "keeps running" in err and "blockcopy pivot" in err
    job = bc.ok("jobs", "--json").json[0]
    assert job["goal"] == "copy" and job["state"] == "running"  # the pivot wish is withdrawn
    assert [j["status"] for j in qemu_jobs(vm)] == ["running"]
    assert vm.run_state() == "running"
    assert bc.ok("recover", "--json").json[0]["state"] == "running"  # recover does not pivot it either
    assert vm.device_node("vda")[1] == vm.disks[0].path
    bc.ok("abort", job["id"])


@pytest.mark.parametrize("before", ["pivot", "finish"])
def test_ctrl_c_of_a_wait_keeps_a_goal_journaled_before_it(attached, bc: Blockcopy, tmp_path: Path,
                                                           before: str) -> None:
    """The goal was asked for before (here by a `copy --pivot` or `--finish` killed while copying; an
    app's request is the same): a later `pivot --wait` interrupted with Ctrl-C stops waiting and
    leaves that goal (or puts it back, when its pivot had replaced it), which `recover` carries out
    (README: Exit status). Review 42: it was withdrawn; review 43: a finish was lost."""
    from blockcopy.journal import Journal

    vm = attached(1)
    crashed = bc("copy", "vm", "vda", str(tmp_path / "d.qcow2"), f"--{before}", "--bandwidth", "0.25",
                 crash_at="journal:copying")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    job = bc.ok("jobs", "--json").json[0]
    assert job["goal"] == before and job["state"] == "running"
    waiting = bc.spawn("pivot", job["id"], "--wait")
    try:
        journal = Journal(bc.state_dir, create=False)
        try:
            wait_for(lambda: any(s.note == "pivot requested" for s in journal.steps(job["id"])), what="the wait")
        finally:
            journal.close()
    finally:
        err = interrupt_wait(waiting)
    assert f"the {before} asked before it stands" in err, err
    assert bc.ok("status", job["id"], "--json").json["goal"] == before, "a goal asked before was withdrawn"
    bc.ok("speed", job["id"], "0")
    bc.ok("recover")  # (the goal may already be carried out by the speed command's own session)
    done = bc.ok("status", job["id"], "--json").json
    assert done["outcome"] == ("pivoted" if before == "pivot" else "not-pivoted"), done
    assert vm.device_node("vda")[1] == (str(tmp_path / "d.qcow2") if before == "pivot" else vm.disks[0].path)


def test_a_vm_not_started_yet_is_refused_with_what_to_do(tmp_path: Path, bc: Blockcopy, accel: str) -> None:
    """QEMU started with -S (``prelaunch``) is not "being migrated": the error says what it is and
    what to do, and the copy goes once the VM runs."""
    vm = ScratchVM(tmp_path, [DiskSpec("vda", str(make_image(tmp_path / "s.qcow2", 64 * MIB)))], accel=accel,
                   extra_args=["-S"])
    try:
        bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
        dest = tmp_path / "d.qcow2"
        refused = bc("copy", "vm", "vda", str(dest), "--pivot")
        assert refused.returncode == 2, refused.stderr
        assert "stopped before its start" in refused.stderr and "migrated" not in refused.stderr
        assert "resume it (QMP `cont`" in refused.stderr
        assert qemu_jobs(vm) == [] and not dest.exists() and vm.run_state() == "prelaunch"
        vm.cmd("cont")
        assert bc.ok("copy", "vm", "vda", str(dest), "--pivot", "--json").json["outcome"] == "pivoted"
    finally:
        vm.kill()


def test_legacy_drive_vm_pivots_twice(tmp_path: Path, bc: Blockcopy, accel: str) -> None:
    image = make_image(tmp_path / "d.qcow2", 64 * MIB)
    vm = ScratchVM(tmp_path, [], accel=accel, extra_args=[
        "-drive", f"file={image},if=none,id=drive0,format=qcow2",
        "-device", "virtio-blk-pci,drive=drive0,id=vda"])
    try:
        bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
        disk = bc.ok("disks", "vm", "--json").json[0]
        assert disk["drive"] == "drive0" and disk["node"].startswith("#")
        vm.write_marker("vda", 0x44, 2 * MIB)
        first = bc.ok("copy", "vm", "drive0", str(tmp_path / "one.qcow2"), "--pivot", "--json").json
        second = bc.ok("copy", "vm", "vda", str(tmp_path / "two.qcow2"), "--pivot", "--json").json
        assert first["outcome"] == second["outcome"] == "pivoted"
        assert vm.device_node("vda")[1] == str(tmp_path / "two.qcow2")
        assert has_pattern(tmp_path / "two.qcow2", 0x44, 2 * MIB)
        assert f"bc-{first['id']}-0" not in node_names(vm)  # the intermediate copy was released
        # ... with the fd set it came in: only the one the device uses now is left.
        assert list(vm.blockcopy_fdsets().values()) == [str(tmp_path / "two.qcow2")]
        assert second["disks"][0]["source"] == str(tmp_path / "one.qcow2")  # shown by path, not /dev/fdset
    finally:
        vm.kill()


def test_help_names_the_commands_and_the_qmp_line(bc: Blockcopy) -> None:
    out = bc.ok("--help").stdout
    for command in ("attach", "disks", "copy", "jobs", "status", "pivot", "finish", "abort", "recover", "demo"):
        assert command in out
    assert "server=on,wait=off" in out
    copy_help = bc.ok("copy", "--help").stdout
    for option in ("--shallow", "--reuse-external", "--bandwidth", "--buf-size", "--mode", "--pivot", "--finish",
                   "--wait"):
        assert option in copy_help


def test_status_log_shows_the_journaled_steps(attached, bc: Blockcopy, tmp_path: Path) -> None:
    attached(1)
    job = bc.ok("copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--pivot", "--json").json
    log = bc.ok("status", job["id"], "--log", "--json").json["log"]
    phases = [entry["phase"] for entry in log]
    assert phases[0] == "starting" and phases[-1] == "done"
    # The point of no return (FINALIZING) is journaled before the first job-finalize.
    assert phases.index("copying") < phases.index("pivoting") < phases.index("finalizing") < phases.index("settling")
    text = bc.ok("status", job["id"], "--log").stdout
    assert "outcome: pivoted" in text and "authoritative image: destination" in text


def test_global_options_work_before_and_after_the_subcommand(vm_factory, bc: Blockcopy, tmp_path: Path) -> None:
    vm = vm_factory(1)
    elsewhere = tmp_path / "elsewhere"
    bc.ok("--state-dir", str(elsewhere), "--json", "attach", "a", "--qmp", str(vm.qmp_socket))
    assert (elsewhere / "journal.sqlite3").exists()
    before = bc.ok("--json", "--state-dir", str(elsewhere), "domains").json
    after = bc.ok("domains", "--state-dir", str(elsewhere), "--json").json
    assert before == after and [d["domain"] for d in before] == ["a"]
    assert not bc.state_dir.exists()  # the environment's state dir was not used


def test_a_speed_qemu_refuses_is_an_error_without_the_daemon_too(attached, bc: Blockcopy, tmp_path: Path) -> None:
    """README (Speed): a limit QEMU refuses is an error, exit 2, and a line in the job's warnings,
    with the daemon or without (review 42: without it the command exited 0). 1e13 MiB/s is beyond
    QEMU's int64 bytes/s."""
    attached(1)
    job = bc.ok("copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--bandwidth", "1", "--json").json
    result = bc("--no-daemon", "speed", job["id"], "1e13")
    assert result.returncode == 2 and "QEMU refused the new speed" in result.stderr, (result.returncode, result.stderr)
    status = bc.ok("status", job["id"], "--json").json
    assert any("could not change the speed" in w for w in status["warnings"]), status["warnings"]
    bc.ok("abort", job["id"])


def test_jobs_and_recover_keep_to_the_domain_asked(attached, bc: Blockcopy, tmp_path: Path) -> None:
    """`jobs --domain` and `recover --domain` (README: Commands) list and touch that domain's jobs
    only (review 42: no test gave --domain)."""
    attached(1, name="vm")
    attached(1, name="other")
    mine = bc.ok("copy", "vm", "vda", str(tmp_path / "a.qcow2"), "--bandwidth", "1", "--json").json
    theirs = bc.ok("copy", "other", "vda", str(tmp_path / "b.qcow2"), "--bandwidth", "1", "--json").json
    assert [j["id"] for j in bc.ok("jobs", "--domain", "other", "--json").json] == [theirs["id"]]
    assert [j["id"] for j in bc.ok("recover", "--domain", "vm", "--no-wait", "--json").json] == [mine["id"]]
    for job in (mine, theirs):
        bc.ok("abort", job["id"])
