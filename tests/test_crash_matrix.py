"""The crash-point matrix: blockcopy SIGKILLs itself after every protocol step, then QEMU stays,
is killed, or quits, then ``blockcopy recover`` must leave a terminal job whose authoritative image
holds every acknowledged write (issue: crash-proof outcomes). Crash points: ``crashpoints.py``.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    MIB,
    Blockcopy,
    has_pattern,
    node_names,
    process_state,
    qemu_jobs,
    wait_for,
)
from crashpoints import CONSISTENT_POINT, POINTS, outcome_journaled

from blockcopy import images
from blockcopy.vm import ScratchVM

AFTER = ("alive", "kill", "quit")  # what happens to QEMU between the crash and `blockcopy recover`
MARKER_AT = 8 * MIB
DURING_AT = 10 * MIB  # written while the mirror copies
BEFORE_AT = 11 * MIB  # written when the copy is ready, just before the pivot or finish
def _worth_running(command: str, point: str, after: str) -> bool:
    """Every point of every command, except what another case already runs the same way: the start
    (creating DEST, adding it, starting the mirror) is the same code for `copy --pivot` and
    `copy --finish`, so only the pivot runs it; and before a mirror exists QEMU quitting and QEMU
    being killed leave the same state (no job to cancel), so only the kill runs there."""
    starting = point.startswith(("journal:starting", "create-image", "add-dest", "qmp:blockdev-mirror"))
    if starting and command == "finish":
        return False
    return not (starting and after == "quit")


CASES = [(command, disks, point, after)
         for (command, disks), points in POINTS.items() for point in points for after in AFTER
         if _worth_running(command, point, after)]


def _expected_when_alive(command: str, point: str) -> tuple[str, str]:
    # Even right after DEST was created: the journaled identity proves it is ours (issue 9, 6).
    return {"pivot": ("pivoted", "destination"), "finish": ("not-pivoted", "source"),
            "abort": ("not-pivoted", "source")}[command]


def _images(vm: ScratchVM, job: dict[str, Any], index: int) -> list[str]:
    disk = job["disks"][index]
    return {"source": [disk["source"]], "destination": [disk["destination"]],
            "both": [disk["source"], disk["destination"]]}[disk["authoritative"]]


#: Where the command stops itself (SIGSTOP) on its way to the crash point, so that the guest can write
#: while the mirror runs and right before the pivot or finish; each marker must then be on the
#: authoritative image too.
WRITE_STOPS = {"journal:copying@1": (0x68, DURING_AT), "journal:pivoting@1": (0x6C, BEFORE_AT),
               "journal:finishing@1": (0x6C, BEFORE_AT)}


def _run_writing_at_stops(bc: Blockcopy, vm: ScratchVM, argv: list[str], point: str,
                          markers: list[tuple[int, int, int]]) -> int:
    """Run a blockcopy command that crashes at ``point``; at each stop of WRITE_STOPS it reaches
    first, write a marker through every disk (acknowledged and flushed), then let it go on."""
    stops = ",".join(f"{where}=stop" for where in WRITE_STOPS)
    env = {**bc.env, "BLOCKCOPY_CRASH_AT": point, "BLOCKCOPY_FAULT_AT": stops}
    trace = Path(bc.state_dir).parent / "stops.trace"
    env["BLOCKCOPY_TRACE_POINTS"] = str(trace)
    proc = subprocess.Popen(bc.argv(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while True:
            wait_for(lambda: proc.poll() is not None or process_state(proc.pid) == "T", timeout=120,
                     what="blockcopy to stop or end")
            if proc.poll() is not None:
                return proc.returncode
            reached = trace.read_text().split()[-1].rsplit("@", 1)[0] + "@1"
            pattern, offset = WRITE_STOPS[reached]
            for i, disk in enumerate(vm.disks):
                vm.write_marker(disk.id, pattern + i, offset)
                markers.append((i, pattern + i, offset))
            os.kill(proc.pid, signal.SIGCONT)
    finally:
        if proc.poll() is None:
            proc.kill()
        out, _err = proc.communicate(timeout=30)
        if proc.returncode != -signal.SIGKILL:
            print(out)


def run_case(vm_factory: Any, bc: Blockcopy, tmp_path: Path, command: str, disks: int, point: str,
             after: str) -> dict[str, Any]:
    vm = vm_factory(disks, size=16 * MIB)
    bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
    names = [d.id for d in vm.disks]
    for i, name in enumerate(names):
        vm.write_marker(name, 0x60 + i, MARKER_AT)
    pairs = [f"--disk={name}={tmp_path / f'dest{i}.qcow2'}" for i, name in enumerate(names)]
    markers: list[tuple[int, int, int]] = []
    if command == "abort":
        job_id = bc.ok("copy", "vm", *pairs, "--bandwidth", "1", "--json").json["id"]
        for i, name in enumerate(names):  # written while the mirror runs
            vm.write_marker(name, 0x68 + i, DURING_AT)
            markers.append((i, 0x68 + i, DURING_AT))
        code = _run_writing_at_stops(bc, vm, ["abort", job_id], point, markers)
    else:
        code = _run_writing_at_stops(bc, vm, ["copy", "vm", *pairs, f"--{command}"], point, markers)
    assert code == -signal.SIGKILL, f"did not crash at {point}"

    if after == "kill":
        vm.kill()
    elif after == "quit":
        vm.quit()

    if after == "alive" or outcome_journaled(command, disks, point):
        expected = {_expected_when_alive(command, point)}
    else:
        expected = {("not-pivoted", "source"), ("not-pivoted", "both")}
    job = recover_and_check(vm, bc, expected, markers)
    if command == "finish":
        # A consistent copy is claimed only once DEST was closed and fsynced (always, with QEMU
        # alive: recovery finishes the job); never for a DEST that QEMU may not have closed.
        claimed = [d["consistent"] for d in job["disks"]]
        if after == "alive":
            assert claimed == [True] * disks, claimed
        elif POINTS[(command, disks)].index(point) < POINTS[(command, disks)].index(CONSISTENT_POINT):
            assert True not in claimed, claimed
    return job


def recover_and_check(vm: ScratchVM, bc: Blockcopy, expected: set[tuple[str, str]],
                      markers: list[tuple[int, int, int]] | None = None) -> dict[str, Any]:
    """Run `blockcopy recover`, then check properties 1-5 of the issue; returns the job. ``markers``:
    (disk index, pattern, offset) written through the devices during the command: each must be on
    that disk's authoritative image(s) too."""
    names = [d.id for d in vm.disks]
    recovered = bc("recover", "--json")
    assert recovered.returncode in (0, 7), recovered.stderr
    job = bc.ok("jobs", "--json").json[-1]

    # 1. terminal, with an authoritative image
    assert job["state"] == "concluded" and job["phase"] == "done"
    assert job["authoritative"] in ("source", "destination", "both")
    assert (job["outcome"], job["authoritative"]) in expected
    # 4 (two disks): all or nothing
    assert len({d["pivoted"] for d in job["disks"]}) == 1, job["disks"]

    for i in range(len(names)):
        for image in _images(vm, job, i):
            # 2. every acknowledged write (flushed markers) and the original data are there
            assert has_pattern(image, 0x60 + i, MARKER_AT), f"{image} lost the marker"
            assert has_pattern(image, 0x11 + i, 0, 4 * MIB), f"{image} lost original data"
            for disk, pattern, offset in markers or ():
                if disk == i:
                    assert has_pattern(image, pattern, offset), f"{image} lost marker {pattern:#x} at {offset}"
        if job["disks"][i]["authoritative"] == "both":
            # proven identical: they are
            assert images.compare(job["disks"][i]["source"], "qcow2", job["disks"][i]["destination"], "qcow2")
        if job["disks"][i]["authoritative"] in ("source", "both"):
            # 4. the source is intact
            ok, report = images.check(job["disks"][i]["source"], "qcow2")
            assert ok, report

    if vm.alive():
        # 3. QEMU uses exactly the authoritative image; run state restored; nothing of ours left
        assert vm.run_state() == "running"
        assert qemu_jobs(vm) == []
        in_use = set()
        for i, name in enumerate(names):
            node, file = vm.device_node(name)
            in_use.add(node)
            assert file in _images(vm, job, i)
            vm.write_marker(name, 0x70 + i, 12 * MIB)
            assert has_pattern(file, 0x70 + i, 12 * MIB)
        stray = {n for n in node_names(vm) if n.startswith("bc-")} - in_use - {f"{n}-file" for n in in_use}
        assert not stray, f"stray nodes {stray}"
        used_files = {vm.device_node(name)[1] for name in names}
        assert set(vm.blockcopy_fdsets().values()) <= used_files, "fd sets of blockcopy's left behind"
        if job["outcome"] == "pivoted":
            assert not {f"{n}-fmt" for n in names} & node_names(vm), "old source still open"

    # 5. a second recover changes nothing
    again = bc("recover", "--json")
    assert again.returncode == 0 and again.json == []
    assert bc.ok("jobs", "--json").json[-1] == job
    return job


@pytest.mark.parametrize(("command", "disks", "point", "after"), CASES,
                         ids=[f"{c}-{d}disk-{p}-{a}" for c, d, p, a in CASES])
def test_crash_point(vm_factory: Any, bc: Blockcopy, tmp_path: Path, command: str, disks: int, point: str,
                     after: str, report: Any) -> None:
    job = run_case(vm_factory, bc, tmp_path, command, disks, point, after)
    report("matrix", (f"{command} {disks}d", point, after, f"{job['outcome']}/{job['authoritative']}"))


@pytest.mark.parametrize(("command", "disks"), list(POINTS))
def test_the_table_matches_a_traced_run(vm_factory: Any, bc: Blockcopy, tmp_path: Path, command: str,
                                        disks: int) -> None:
    vm = vm_factory(disks, size=16 * MIB)
    bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
    pairs = [f"--disk={d.id}={tmp_path / f'dest{i}.qcow2'}" for i, d in enumerate(vm.disks)]
    trace = tmp_path / "trace"
    bc.env["BLOCKCOPY_TRACE_POINTS"] = str(trace)
    if command == "abort":
        bc.env.pop("BLOCKCOPY_TRACE_POINTS")
        job_id = bc.ok("copy", "vm", *pairs, "--bandwidth", "1", "--json").json["id"]
        bc.env["BLOCKCOPY_TRACE_POINTS"] = str(trace)
        bc.ok("abort", job_id)
    else:
        bc.ok("copy", "vm", *pairs, f"--{command}")
    assert trace.read_text().split() == POINTS[(command, disks)]


def test_recovery_killed_during_recovery_still_converges(attached, bc: Blockcopy, tmp_path: Path) -> None:
    vm = attached(2, size=16 * MIB)
    vm.write_marker("vda", 0x66, MARKER_AT)
    pairs = [f"--disk={d.id}={tmp_path / f'dest{i}.qcow2'}" for i, d in enumerate(vm.disks)]
    assert bc("copy", "vm", *pairs, "--pivot", crash_at="qmp:stop").returncode == -signal.SIGKILL
    for point in ("qmp:job-complete@1", "qmp:job-finalize@1", "journal:settling@1", "qmp:job-dismiss@1"):
        assert bc("recover", crash_at=point).returncode == -signal.SIGKILL, point
    job = bc.ok("recover", "--json").json[0]
    assert job["outcome"] == "pivoted" and [d["pivoted"] for d in job["disks"]] == [True, True]
    assert vm.run_state() == "running" and qemu_jobs(vm) == []
    assert has_pattern(vm.device_node("vda")[1], 0x66, MARKER_AT)
    assert bc.ok("recover", "--json").json == []


SOAK_ITERATIONS = 10  # (the daemon's random-kill test adds 10 kills under load: tests/test_service.py)


def _journaled(state: Path) -> bool:
    """A job is in the journal (read-only, without blockcopy: its CLI would take the domain's lock)."""
    journal = state / "journal.sqlite3"
    if not journal.exists():
        return False
    try:
        with sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=1.0) as db:
            return bool(db.execute("SELECT count(*) FROM operations").fetchone()[0])
    except sqlite3.Error:
        return False


def test_soak_random_sigkill_during_copy_pivot(vm_factory: Any, bc: Blockcopy, tmp_path: Path, report: Any) -> None:
    """SIGKILL `copy --pivot` at a random moment, do something random to QEMU, recover, check."""
    rng = random.Random(20121122)  # fixed: a failure names its iteration and can be replayed
    results: list[tuple[str, str]] = []
    for iteration in range(SOAK_ITERATIONS):
        work = tmp_path / f"it{iteration}"
        work.mkdir()
        disks, after, delay = rng.choice((1, 2)), rng.choice(AFTER), rng.uniform(0.0, 0.9)
        vm = vm_factory(disks, size=16 * MIB, name=f"soak{iteration}")
        state = Blockcopy(work / "state")
        state.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
        for i, d in enumerate(vm.disks):
            vm.write_marker(d.id, 0x60 + i, MARKER_AT)
        pairs = [f"--disk={d.id}={work / f'dest{i}.qcow2'}" for i, d in enumerate(vm.disks)]
        proc = state.spawn("copy", "vm", *pairs, "--pivot", "--bandwidth", "48")
        # The random moment is counted from the job's first record, not from the command's start,
        # whose cost (Python's start-up) depends on how loaded the machine is.
        wait_for(lambda p=proc, w=work: p.poll() is not None or _journaled(w / "state"), timeout=60,
                 what="the first record")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if after == "kill":
            vm.kill()
        elif after == "quit":
            vm.quit()
        context = f"iteration {iteration}: {disks} disk(s), killed {delay:.3f} s after its first record, QEMU {after}"
        jobs = state.ok("jobs", "--json").json if (work / "state").exists() else []
        if not jobs:
            results.append((context, "killed before the job was journaled"))
            continue
        expected = {("pivoted", "destination"), ("failed", "source")}
        if after != "alive":
            expected |= {("not-pivoted", "source"), ("not-pivoted", "both")}
        try:
            job = recover_and_check(vm, state, expected)
        except AssertionError as exc:
            raise AssertionError(f"{context}: {exc}") from exc
        results.append((context, f"{job['outcome']}/{job['authoritative']}"))
        vm.kill()
    for row in results:
        report("soak", row)
    assert len(results) == SOAK_ITERATIONS
    assert sum("/" in r for _c, r in results) >= SOAK_ITERATIONS // 2, "most kills must hit a journaled job"


@pytest.mark.parametrize("point", ["journal:pivoting@1", "qmp:job-complete@1", "journal:settling@1"])
def test_user_paused_vm_stays_paused_through_crash_and_recovery(attached, bc: Blockcopy, tmp_path: Path,
                                                                point: str) -> None:
    vm = attached(1, size=16 * MIB)
    vm.cmd("stop")
    crashed = bc("copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--pivot", crash_at=point)
    assert crashed.returncode == -signal.SIGKILL
    job = bc.ok("recover", "--json").json[0]
    assert job["outcome"] == "pivoted" and job["paused_by_blockcopy"] is False
    assert vm.run_state() == "paused"
    assert vm.device_node("vda")[1] == str(tmp_path / "d.qcow2")


def test_crash_points_are_inert_unless_asked(bc: Blockcopy) -> None:
    assert "BLOCKCOPY_CRASH_AT" not in bc.env and "BLOCKCOPY_CRASH_AT" not in os.environ


def test_recover_goes_on_past_an_unreachable_domain(vm_factory: Any, bc: Blockcopy, tmp_path: Path) -> None:
    busy_vm, crashed_vm = vm_factory(1, size=16 * MIB, name="busy"), vm_factory(1, size=16 * MIB, name="crashed")
    bc.ok("attach", "busy", "--qmp", str(busy_vm.qmp_socket))
    bc.ok("attach", "crashed", "--qmp", str(crashed_vm.qmp_socket))
    slow = bc.ok("copy", "busy", "vda", str(tmp_path / "slow.qcow2"), "--bandwidth", "1", "--json").json
    assert bc("copy", "crashed", "vda", str(tmp_path / "d.qcow2"), "--pivot",
              crash_at="qmp:stop").returncode == -signal.SIGKILL
    holder = socket.socket(socket.AF_UNIX)
    holder.connect(str(busy_vm.qmp_socket))  # another client holds the busy domain's QMP socket
    try:
        holder.recv(4096)
        result = bc("recover", "--json")
    finally:
        holder.close()
    assert result.returncode == 8
    assert "busy:" in result.stderr and "another client" in result.stderr
    jobs = {j["domain"]: j for j in bc.ok("jobs", "--json").json}
    assert jobs["crashed"]["outcome"] == "pivoted" and crashed_vm.run_state() == "running"
    assert jobs["busy"]["id"] == slow["id"] and jobs["busy"]["outcome"] is None
    assert bc("recover", "--no-wait", "--json").returncode == 0
    bc.ok("abort", slow["id"])


PIPELINED = [(disks, point, after)
             for disks, points in ((1, ("run-state@1", "qmp:stop@1", "qmp:job-complete@1")),
                                   (2, ("run-state@1", "qmp:stop@1", "qmp:job-complete@1", "qmp:job-complete@2")))
             for point in points for after in AFTER]


@pytest.mark.parametrize(("disks", "point", "after"), PIPELINED,
                         ids=[f"pivot-{d}disk-{p}-{a}" for d, p, a in PIPELINED])
def test_crash_point_with_the_job_completes_behind_the_stop(vm_factory: Any, bc: Blockcopy, tmp_path: Path,
                                                           disks: int, point: str, after: str) -> None:
    """The matrix's kills around the pause, on the path blockcopy takes without a fault: the
    job-completes written right behind `stop` (BLOCKCOPY_FAULT_SERIAL=0 keeps it under the fault).
    A kill at `qmp:stop` then finds them sent, and done or about to be, with nothing journaled
    since PIVOTING; the same five properties must hold."""
    bc.env["BLOCKCOPY_FAULT_SERIAL"] = "0"
    run_case(vm_factory, bc, tmp_path, "pivot", disks, point, after)
