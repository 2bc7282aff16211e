"""``blockcopy serve``: a real daemon process over real QEMU, used through the CLI and raw HTTP.

What would break the service's promises: two clients racing one request id, a client asking while
another waits, a daemon killed at random while 20 VMs copy, an event consumer that reconnects, a
job's speed changed and then the daemon killed before QEMU heard of it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import MIB, Blockcopy, VMFactory, guest_reads, interrupt_wait, wait_for
from service import EventLog, Served

from blockcopy.vm import ScratchVM


@pytest.fixture
def served(tmp_path: Path) -> Any:
    daemons: list[Served] = []

    def start(*args: str) -> Served:
        daemon = Served(tmp_path / "state", *args).start()
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill9()
        if daemon.log.exists():  # (pytest shows it with a failure only: the daemon's side of a hang)
            print(f"--- {daemon.log} (last 8000 characters)\n{daemon.log.read_text(errors='replace')[-8000:]}")


def _copy_body(vm: ScratchVM, name: str, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    disks = [{"disk": d.id, "destination": str(tmp_path / f"{name}-{d.id}-dst.qcow2")} for d in vm.disks]
    return {"domain": name, "disks": disks, **extra}


_PROBE = """
import json, sys
from blockcopy.cli import main
from blockcopy.service import client
streams = []
follow = client.DaemonClient.events
def events(self, *args, **kwargs):
    streams.append(args)
    yield from follow(self, *args, **kwargs)
client.DaemonClient.events = events
code = main(sys.argv[1:])
heavy = ("asyncio", "qemu.qmp", "sqlite3", "http.client", "blockcopy.records", "dataclasses", "pathlib", "typing",
         "urllib.parse", "email", "ssl")
print(json.dumps([sorted(m for m in heavy if m in sys.modules), len(streams)]), file=sys.stderr)
sys.exit(code)
"""


def _probe(bc: Blockcopy, *args: str) -> tuple[Any, list[str], int]:
    """A CLI command's ``--json`` output; which of the modules that cost most of a command's start
    it loaded (asyncio, QMP, SQLite, the records' dataclasses, HTTP and URL libraries, typing,
    pathlib); and how many event streams from the daemon it followed."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], env=bc.env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    loaded, streams = json.loads(proc.stderr.splitlines()[-1])
    return ([j["id"] for j in out] if isinstance(out, list) else out), loaded, streams


def _core_loaded_by(bc: Blockcopy, *args: str) -> tuple[Any, list[str]]:
    out, loaded, _streams = _probe(bc, *args)
    return out, loaded


def test_cli_goes_through_the_daemon_same_output_and_exit_codes(served: Any, vm_factory: VMFactory, bc: Blockcopy,
                                                                tmp_path: Path) -> None:
    daemon = served()
    vm = vm_factory(1)
    bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
    assert [d["domain"] for d in daemon.ok("GET", "/v1/domains")] == ["vm"]  # the daemon attached it
    dest = tmp_path / "dst.qcow2"
    job = bc.ok("copy", "vm", "vda", str(dest), "--bandwidth", "0.25", "--request-id", "r-1", "--json").json
    # The same request again (a script that retries): the same job, nothing new started.
    again = bc.ok("copy", "vm", "vda", str(dest), "--bandwidth", "0.25", "--request-id", "r-1", "--json").json
    assert again["id"] == job["id"]
    assert [j["id"] for j in bc.ok("jobs", "--json").json] == [job["id"]]
    # Through the daemon the command loads none of the core (its start is mostly imports); without
    # the daemon it does (the probe's control). A copy too, up to its result (a bad option the
    # daemon refuses, as the embedded backend does, with the same message and exit status).
    assert _core_loaded_by(bc, "jobs", "--json") == ([job["id"]], [])
    assert {"asyncio", "blockcopy.records", "dataclasses", "pathlib", "qemu.qmp", "sqlite3"} <= set(
        _core_loaded_by(bc, "status", job["id"], "--json", "--no-daemon")[1])
    copied, loaded = _core_loaded_by(bc, "copy", "vm", "vda", str(dest), "--bandwidth", "0.25", "--request-id",
                                     "r-1", "--json")
    assert (copied["id"], loaded) == (job["id"], [])
    for where in ([], ["--no-daemon"]):
        bad = bc("copy", "vm", "vda", str(tmp_path / "bad.qcow2"), "--dest-option", "cache.direct=maybe", *where)
        assert bad.returncode == 2 and "cache.direct takes on or off, not 'maybe'" in bad.stderr, bad.stderr
    other = bc("copy", "vm", "vda", str(tmp_path / "other.qcow2"), "--request-id", "r-1")
    assert other.returncode == 2 and "different request" in other.stderr
    # Without the daemon, the domain it holds is refused (not driven twice); status reads the journal.
    busy = bc("abort", job["id"], "--no-daemon")
    assert busy.returncode == 5 and "busy" in busy.stderr, busy.stderr
    assert bc.ok("status", job["id"], "--no-daemon", "--json").json["outcome"] is None
    vm.write_marker("vda", 0x5A, 8 * MIB)  # a guest write while copying
    waiting = bc.spawn("pivot", job["id"], "--wait", "--json")
    try:
        # Another client is answered while one waits (one QMP connection, the daemon's).
        listed = bc.ok("jobs", "--json").json
        assert listed[0]["id"] == job["id"] and listed[0]["outcome"] is None
        assert bc.ok("status", job["id"]).stdout.startswith(f"job {job['id']}")
        assert waiting.poll() is None, "the pivot should still wait for the throttled copy"
        assert [j["speed"] for j in vm.cmd("query-block-jobs")] == [MIB // 4]
        changed = bc.ok("speed", job["id"], "0.5", "--json").json
        assert changed["bandwidth"] == MIB // 2 and changed["outcome"] is None
        assert [j["speed"] for j in vm.cmd("query-block-jobs")] == [MIB // 2]
        bc.ok("speed", job["id"], "0")  # unlimited: the copy ends, the waiting pivot goes on
        out, err = waiting.communicate(timeout=120)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, err
    result = json.loads(out)
    assert result["outcome"] == "pivoted" and result["authoritative"] == "destination"
    assert vm.device_node("vda")[0] == f"bc-{job['id']}-0"  # QEMU's view: the guest's disk is DEST
    assert guest_reads(vm, "vda", 0x5A, 8 * MIB) and guest_reads(vm, "vda", 0x11, 0)
    finished = bc("pivot", job["id"])
    assert finished.returncode == 2 and "already ended" in finished.stderr
    assert daemon.stop() == 0


def test_one_request_id_sent_at_once_by_several_clients_starts_one_job(served: Any, vm_factory: VMFactory,
                                                                      tmp_path: Path) -> None:
    daemon = served()
    vm = vm_factory(1)
    daemon.ok("POST", "/v1/domains", {"name": "vm", "qmp_socket": str(vm.qmp_socket)})
    body = _copy_body(vm, "vm", tmp_path, bandwidth_mib=1)
    replies: list[Any] = []

    def send() -> None:
        replies.append(daemon.call("POST", "/v1/jobs", body, headers={"Idempotency-Key": "same"}))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(r.status for r in replies) == [200] * 5 + [201]
    assert len({r.body["id"] for r in replies}) == 1
    assert [r.headers.get("idempotent-replayed") for r in replies].count("true") == 5
    assert len(daemon.ok("GET", "/v1/jobs")) == 1 and len(vm.cmd("query-block-jobs")) == 1
    conflict = daemon.call("POST", "/v1/jobs", {**body, "mode": "background"}, headers={"Idempotency-Key": "same"})
    assert conflict.status == 409 and conflict.body["error"] == "RequestConflict"
    assert conflict.headers["content-type"] == "application/problem+json"


def _load(daemon: Served, vms: list[ScratchVM], tmp_path: Path, *, kills: int = 0, seed: int = 0) -> dict[str, str]:
    """Copies with pivot of every VM, started by 4 clients at once (each retrying its request id until
    answered); ``kills`` times, the daemon is killed with SIGKILL at a random moment and restarted.
    Returns the job id of each VM."""
    rng = random.Random(seed)
    jobs: dict[str, str] = {}
    queue = list(range(len(vms)))
    lock = threading.Lock()
    failures: list[str] = []

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop()
            body = _copy_body(vms[i], f"vm{i}", tmp_path, goal="pivot", bandwidth_mib=4)
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    reply = daemon.call("POST", "/v1/jobs", body, headers={"Idempotency-Key": f"job-of-vm{i}"})
                except OSError:
                    time.sleep(0.1)  # the daemon is being restarted: send the same request again
                    continue
                if reply.status in (200, 201):
                    jobs[f"vm{i}"] = reply.body["id"]
                    break
                if reply.status >= 500 or (reply.status == 409 and reply.body.get("error") == "DomainBusy"):
                    time.sleep(0.1)
                    continue
                failures.append(f"vm{i}: {reply.status} {reply.body}")
                break

    clients = [threading.Thread(target=client) for _ in range(4)]
    for t in clients:
        t.start()
    for _ in range(kills):
        time.sleep(rng.uniform(0.05, 0.8))
        daemon.kill9()
        daemon.start()
    for t in clients:
        t.join(timeout=300)
    assert not failures, failures
    assert len(jobs) == len(vms)
    return jobs


def _check_pivoted(daemon: Served, vms: list[ScratchVM], jobs: dict[str, str], *, running: int) -> None:
    def check(i: int) -> None:
        vm = vms[i]
        job = daemon.ok("GET", f"/v1/jobs/{jobs[f'vm{i}']}")
        assert job["outcome"] == "pivoted", job
        for d, disk in zip(vm.disks, job["disks"], strict=True):
            assert disk["pivoted"] is True
            # QEMU's view: the device is DEST (its node is blockcopy's) and reads the source's data.
            assert vm.device_node(d.id)[0] == f"bc-{job['id']}-{vm.disks.index(d)}", vm.device_node(d.id)
            assert guest_reads(vm, d.id, 0x11 + vm.disks.index(d), 0, MIB)
        assert vm.run_state() == ("running" if i < running else "paused")  # as its user left it
        assert not vm.cmd("query-block-jobs")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(check, range(len(vms))))


def _vms(vm_factory: VMFactory, count: int, *, running: int) -> list[ScratchVM]:
    """``count`` VMs with one or two disks; the first ``running`` run, the others are paused (by
    their "user") as soon as they answer: the firmware's boot takes seconds of CPU per VM, which
    20 VMs at once would take from a 2-core machine."""
    def start(i: int) -> ScratchVM:
        vm = vm_factory(1 + i % 2, size=16 * MIB, name=f"vm{i}", fill=True)
        if i >= running:
            vm.cmd("stop")
        return vm

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(start, range(count)))


def test_twenty_vms_copied_at_once_while_other_clients_ask(served: Any, vm_factory: VMFactory,
                                                           tmp_path: Path) -> None:
    daemon = served()
    vms = _vms(vm_factory, 20, running=4)
    for i, vm in enumerate(vms):
        daemon.ok("POST", "/v1/domains", {"name": f"vm{i}", "qmp_socket": str(vm.qmp_socket)})
    answered: list[int] = []
    stop = threading.Event()

    def ask() -> None:
        while not stop.wait(0.02):
            answered.append(daemon.call("GET", "/v1/jobs").status)
            for job in daemon.ok("GET", "/v1/jobs")[:3]:
                answered.append(daemon.call("GET", f"/v1/jobs/{job['id']}").status)

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        jobs = _load(daemon, vms, tmp_path)
        wait_for(lambda: all(j["outcome"] for j in daemon.ok("GET", "/v1/jobs")), 300, "every job to end")
    finally:
        stop.set()
        asker.join(timeout=60)
    assert answered and set(answered) == {200}
    _check_pivoted(daemon, vms, jobs, running=4)


def test_daemon_killed_at_random_under_load_every_job_ends_right_and_events_arrive_once(
        served: Any, vm_factory: VMFactory, tmp_path: Path) -> None:
    daemon = served()
    vms = _vms(vm_factory, 8, running=4)
    for i, vm in enumerate(vms):
        daemon.ok("POST", "/v1/domains", {"name": f"vm{i}", "qmp_socket": str(vm.qmp_socket)})
    events = EventLog(daemon).start()
    try:
        jobs = _load(daemon, vms, tmp_path, kills=10, seed=12)
        wait_for(lambda: all(j["outcome"] for j in daemon.ok("GET", "/v1/jobs")), 300, "every job to end")
        wait_for(lambda: sum(1 for e in events.events if e[1] == "outcome") >= len(jobs), 60, "outcome events")
    finally:
        events.stop()
    _check_pivoted(daemon, vms, jobs, running=4)
    assert events.reconnects >= 10
    seqs = [seq for seq, _kind, _data in events.events]
    assert seqs == sorted(set(seqs)), "events repeated or out of order"
    outcomes = Counter(data["job"] for _seq, kind, data in events.events if kind == "outcome")
    assert outcomes == Counter(set(jobs.values())), outcomes
    created = Counter(data["job"] for _seq, kind, data in events.events if kind == "created")
    assert created == Counter(set(jobs.values())), "a retried request started a second job"
    assert len(daemon.ok("GET", "/v1/jobs")) == len(vms)


def test_a_speed_change_survives_a_kill_before_qemu_heard_of_it(served: Any, vm_factory: VMFactory,
                                                                  tmp_path: Path, bc: Blockcopy) -> None:
    """Journaled first, then sent: a daemon killed in between sends it after its restart."""
    daemon = served()
    vm = vm_factory(1)
    daemon.ok("POST", "/v1/domains", {"name": "vm", "qmp_socket": str(vm.qmp_socket)})
    job = daemon.ok("POST", "/v1/jobs", _copy_body(vm, "vm", tmp_path, bandwidth_mib=1))
    daemon.kill9()
    # What a daemon killed right after journaling the speed leaves: the record says 3 MiB/s, not yet sent.
    import sqlite3

    db = sqlite3.connect(daemon.state_dir / "journal.sqlite3")
    record = json.loads(db.execute("SELECT record FROM operations WHERE id = ?", (job["id"],)).fetchone()[0])
    record.update(bandwidth=3 * MIB, speed_applied=False)
    with db:
        db.execute("UPDATE operations SET record = ? WHERE id = ?", (json.dumps(record), job["id"]))
    db.close()
    assert [j["speed"] for j in vm.cmd("query-block-jobs")] == [MIB]
    daemon.start()
    wait_for(lambda: [j["speed"] for j in vm.cmd("query-block-jobs")] == [3 * MIB], 30, "the speed to be sent")
    assert daemon.ok("GET", f"/v1/jobs/{job['id']}")["bandwidth"] == 3 * MIB
    assert daemon.ok("POST", f"/v1/jobs/{job['id']}/abort")["outcome"] == "not-pivoted"


def test_sigterm_during_a_pivot_finishes_the_pivot_and_leaves_the_guest_running(
        served: Any, vm_factory: VMFactory, tmp_path: Path) -> None:
    daemon = served()
    vm = vm_factory(2)
    daemon.ok("POST", "/v1/domains", {"name": "vm", "qmp_socket": str(vm.qmp_socket)})
    job = daemon.ok("POST", "/v1/jobs", _copy_body(vm, "vm", tmp_path, goal="pivot"))
    wait_for(lambda: daemon.ok("GET", f"/v1/jobs/{job['id']}")["phase"] != "copying", 60, "the pivot to begin")
    assert daemon.stop() == 0
    served_again = Served(daemon.state_dir).start()
    try:
        wait_for(lambda: served_again.ok("GET", f"/v1/jobs/{job['id']}")["outcome"] is not None, 60, "the outcome")
        assert served_again.ok("GET", f"/v1/jobs/{job['id']}")["outcome"] == "pivoted"
        assert vm.run_state() == "running"
    finally:
        served_again.stop()


def test_two_jobs_of_one_guest_pivot_one_after_the_other(served: Any, vm_factory: VMFactory, tmp_path: Path) -> None:
    """Two jobs on one domain, ready at the same moment: each pause is its own, never one pivot's
    `cont` in the middle of the other's."""
    daemon = served()
    vm = vm_factory(2)
    daemon.ok("POST", "/v1/domains", {"name": "vm", "qmp_socket": str(vm.qmp_socket)})
    jobs = [daemon.ok("POST", "/v1/jobs", {"domain": "vm", "disks": [
        {"disk": d.id, "destination": str(tmp_path / f"{d.id}-dst.qcow2")}]}) for d in vm.disks]
    wait_for(lambda: all(daemon.ok("GET", f"/v1/jobs/{j['id']}")["state"] == "ready" for j in jobs), 120, "ready")
    with ThreadPoolExecutor(2) as pool:  # both pivots asked at the same moment
        ended = list(pool.map(lambda j: daemon.ok("POST", f"/v1/jobs/{j['id']}/pivot"), jobs))
    assert [j["outcome"] for j in ended] == ["pivoted", "pivoted"]
    events = [e for e in _all_events(daemon) if e[1] == "pause"]
    windows = sorted((data["stop_ts"], data["resume_ts"]) for _seq, _kind, data in events)
    assert len(windows) == 2 and windows[0][1] <= windows[1][0], windows
    assert vm.run_state() == "running"
    for i, d in enumerate(vm.disks):
        assert vm.device_node(d.id)[0] == f"bc-{jobs[i]['id']}-0"


def _all_events(daemon: Served) -> list[tuple[int, str, dict[str, Any]]]:
    log = EventLog(daemon).start()
    try:
        last = daemon.ok("GET", "/v1/health")["last_event"]
        wait_for(lambda: log.last() >= last, 30, "the events so far")
    finally:
        log.stop()
    return log.events


def test_recover_and_refused_requests_racing_copies_never_drive_a_job_twice(
        served: Any, vm_factory: VMFactory, tmp_path: Path) -> None:
    """While copies start, other clients ask for `recover` and send copies that are refused: each
    job still has one driver (one `created`, one `outcome`, no record written over another)."""
    daemon = served()
    vms = _vms(vm_factory, 4, running=4)
    for i, vm in enumerate(vms):
        daemon.ok("POST", "/v1/domains", {"name": f"vm{i}", "qmp_socket": str(vm.qmp_socket)})
    stop = threading.Event()
    statuses: list[int] = []

    def meddle() -> None:
        while not stop.is_set():
            statuses.append(daemon.call("POST", "/v1/recover").status)
            statuses.append(daemon.call("POST", "/v1/jobs", _copy_body(vms[0], "vm0", tmp_path / "x",
                                                                     cluster_size=3)).status)

    meddlers = [threading.Thread(target=meddle) for _ in range(2)]
    for t in meddlers:
        t.start()
    try:
        jobs = {f"vm{i}": daemon.ok("POST", "/v1/jobs", _copy_body(vm, f"vm{i}", tmp_path, goal="pivot"))["id"]
                for i, vm in enumerate(vms)}
        wait_for(lambda: all(daemon.ok("GET", f"/v1/jobs/{j}")["outcome"] for j in jobs.values()), 120, "the pivots")
    finally:
        stop.set()
        for t in meddlers:
            t.join(timeout=60)
    assert set(statuses) <= {200, 400} and statuses.count(400) > 0
    _check_pivoted(daemon, vms, jobs, running=4)
    events = _all_events(daemon)
    for kind in ("created", "outcome"):
        assert Counter(d["job"] for _s, k, d in events if k == kind) == Counter(jobs.values()), kind
    assert "another writer" not in daemon.log.read_text()


def test_an_abort_after_the_pivot_ended_is_refused_and_changes_nothing(served: Any, vm_factory: VMFactory,
                                                                       tmp_path: Path) -> None:
    daemon = served()
    vm = vm_factory(1)
    daemon.ok("POST", "/v1/domains", {"name": "vm", "qmp_socket": str(vm.qmp_socket)})
    job = daemon.ok("POST", "/v1/jobs", _copy_body(vm, "vm", tmp_path, goal="pivot"))
    wait_for(lambda: daemon.ok("GET", f"/v1/jobs/{job['id']}")["outcome"] is not None, 60, "the pivot")
    refused = daemon.call("POST", f"/v1/jobs/{job['id']}/abort")  # (its cleanup may still run: refused too)
    assert refused.status == 400 and "already ended" in refused.detail
    wait_for(lambda: daemon.ok("GET", f"/v1/jobs/{job['id']}")["state"] == "concluded", 60, "the cleanup")
    after = daemon.ok("GET", f"/v1/jobs/{job['id']}")
    assert after["goal"] == "pivot" and after["outcome"] == "pivoted"
    kinds = [k for _s, k, d in _all_events(daemon) if d["job"] == job["id"]]
    assert kinds[-1] == "state" and "goal" not in kinds[kinds.index("outcome"):], kinds


def test_ctrl_c_of_a_wait_through_the_daemon_withdraws_only_that_pivot(served: Any, vm_factory: VMFactory,
                                                                        bc: Blockcopy, tmp_path: Path) -> None:
    daemon = served()
    vm = vm_factory(1)
    bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
    job = bc.ok("copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--bandwidth", "0.25", "--json").json
    waiting = bc.spawn("pivot", job["id"], "--wait")
    wait_for(lambda: daemon.ok("GET", f"/v1/jobs/{job['id']}")["goal"] == "pivot", 30, "the pivot asked")
    waiting.send_signal(signal.SIGINT)
    _out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 130, err
    assert "keeps running" in err
    bc.ok("speed", job["id"], "0")
    wait_for(lambda: daemon.ok("GET", f"/v1/jobs/{job['id']}")["state"] == "ready", 60, "ready")
    time.sleep(1)
    status = daemon.ok("GET", f"/v1/jobs/{job['id']}")
    assert status["goal"] == "copy" and status["outcome"] is None and status["state"] == "ready"
    assert vm.device_node("vda")[0] == "vda-fmt"  # still on the source: the pivot was withdrawn


@pytest.mark.parametrize("before", ["pivot", "finish"])
def test_ctrl_c_of_a_wait_through_the_daemon_keeps_a_goal_an_app_asked_for(served: Any, vm_factory: VMFactory,
                                                                           bc: Blockcopy, tmp_path: Path,
                                                                           before: str) -> None:
    """An app asked for the pivot or finish (the API's goal); an operator's `pivot --wait`
    interrupted with Ctrl-C stops waiting and leaves the app's goal, or puts it back when its
    pivot replaced it (reviews 42-43: the CLI withdrew it, and the app's goal was lost; the
    daemon now withdraws only what the request with the CLI's token journaled)."""
    daemon = served()
    vm = vm_factory(1)
    bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
    job = daemon.ok("POST", "/v1/jobs", _copy_body(vm, "vm", tmp_path, bandwidth_mib=0.25, goal=before))
    assert job["goal"] == before
    waiting = bc.spawn("pivot", job["id"], "--wait")
    try:
        if before == "finish":  # (its pivot replaces the finish: seen)
            wait_for(lambda: daemon.ok("GET", f"/v1/jobs/{job['id']}")["goal"] == "pivot", 30, "the CLI's pivot")
        else:
            time.sleep(3)  # (nothing to see: the goal is the same; "keeps running" below says it waited)
    finally:
        err = interrupt_wait(waiting)
    assert f"the {before} asked before it stands" in err, err
    assert daemon.ok("GET", f"/v1/jobs/{job['id']}")["goal"] == before, "the app's goal was withdrawn"
    bc.ok("speed", job["id"], "0")
    wait_for(lambda: daemon.ok("GET", f"/v1/jobs/{job['id']}")["outcome"] is not None, 60, "the app's goal")
    assert daemon.ok("GET", f"/v1/jobs/{job['id']}")["outcome"] == ("pivoted" if before == "pivot" else "not-pivoted")


def test_interrupted_waits_through_the_daemon_withdraw_only_their_own_goals(served: Any, vm_factory: VMFactory,
                                                                             bc: Blockcopy, tmp_path: Path) -> None:
    """Review 44. Two operators' waits on one job, a pivot then a finish, both interrupted (the
    pivot's first): the job keeps copying, not pivoted by the first wait's goal put back. Then an
    app asks for a finish while a CLI's pivot waits: the CLI's Ctrl-C leaves the app's finish."""
    import threading

    daemon = served()
    vm = vm_factory(1)
    bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
    job = daemon.ok("POST", "/v1/jobs", _copy_body(vm, "vm", tmp_path, bandwidth_mib=0.25))
    url = f"/v1/jobs/{job['id']}"
    spawned: list[Any] = []

    def wait_on(goal: str) -> Any:
        proc = bc.spawn(goal, job["id"], "--wait")
        spawned.append(proc)
        wait_for(lambda: daemon.ok("GET", url)["goal"] == goal, 30, f"the {goal} asked")
        return proc

    try:
        first, second = wait_on("pivot"), wait_on("finish")
        interrupt_wait(first)
        assert daemon.ok("GET", url)["goal"] == "finish", "the later wait's finish stands"
        interrupt_wait(second)
        assert daemon.ok("GET", url)["goal"] == "copy", "two interrupted waits leave what stood before both"
        # An older CLI's keep-copying (no token) withdraws whatever stands, and forgets the waits:
        # a later wait's Ctrl-C then withdraws its own pivot (review 45: a stale entry kept it).
        stale = wait_on("pivot")
        assert daemon.ok("POST", f"{url}/keep-copying")["goal"] == "copy"
        again = wait_on("pivot")
        interrupt_wait(again)
        assert daemon.ok("GET", url)["goal"] == "copy", "a stale wait's entry kept the pivot"
        interrupt_wait(stale)
        third = wait_on("pivot")
        replies: list[Any] = []
        app = threading.Thread(target=lambda: replies.append(daemon.call("POST", f"{url}/finish?wait=true",
                                                                         timeout=120)))
        app.start()
        wait_for(lambda: daemon.ok("GET", url)["goal"] == "finish", 30, "the app's finish")
        assert "the finish asked before it stands" in interrupt_wait(third)
        assert daemon.ok("GET", url)["goal"] == "finish", "the app's finish was withdrawn"
        bc.ok("speed", job["id"], "0")
        app.join(timeout=120)
        assert replies and replies[0].status == 200 and replies[0].body["outcome"] == "not-pivoted", replies
    finally:
        for proc in spawned:
            if proc.poll() is None:
                proc.kill()


def test_a_domain_a_command_holds_at_the_daemons_start_is_adopted_when_the_command_ends(
        served: Any, vm_factory: VMFactory, bc: Blockcopy, tmp_path: Path) -> None:
    """README (Starting it): the daemon takes every domain's lock file; one that a blockcopy command
    holds is adopted when the command ends, and its jobs are followed from then on: here the killed
    command's pivot is carried out by the daemon with nobody asking it anything but GETs (review
    42: no test started the daemon while a command held a domain)."""
    vm = vm_factory(1, size=16 * MIB)
    bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
    waiting = bc.spawn("copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--pivot", "--bandwidth", "1")
    lock = bc.state_dir / "locks" / "vm.lock"
    wait_for(lambda: lock.exists() and lock.read_text().strip() == str(waiting.pid), 30, "the command's lock")
    wait_for(lambda: any(j["status"] == "running" for j in vm.cmd("query-jobs")), 30, "the mirror to run")
    daemon = served()
    job = daemon.ok("GET", "/v1/jobs")[0]
    assert (job["state"], job["goal"]) == ("running", "pivot")
    waiting.kill()  # (its lock goes with it; the journal keeps the pivot asked)
    waiting.wait(timeout=30)
    assert daemon.ok("GET", f"/v1/jobs/{job['id']}")["outcome"] is None, "the command pivoted before it was killed"
    wait_for(lambda: daemon.ok("GET", f"/v1/jobs/{job['id']}")["outcome"] is not None, 90, "the daemon's pivot")
    assert daemon.ok("GET", f"/v1/jobs/{job['id']}")["outcome"] == "pivoted"
    assert vm.device_node("vda")[1] == str(tmp_path / "d.qcow2")


def test_a_detach_queued_before_a_copy_makes_the_copy_fail_cleanly(served: Any, vm_factory: VMFactory,
                                                                  tmp_path: Path) -> None:
    daemon = served()
    vm = vm_factory(1)
    daemon.ok("POST", "/v1/domains", {"name": "vm", "qmp_socket": str(vm.qmp_socket)})
    replies: dict[str, Any] = {}
    os.kill(vm.process.pid, signal.SIGSTOP)  # a request on the domain waits for QEMU, holding its lock
    try:
        order = [("disks", "GET", "/v1/domains/vm/disks", None), ("detach", "DELETE", "/v1/domains/vm", None),
                 ("copy", "POST", "/v1/jobs", _copy_body(vm, "vm", tmp_path))]
        threads = []
        for name, method, path, body in order:
            thread = threading.Thread(target=lambda n=name, m=method, p=path, b=body:
                                      replies.__setitem__(n, daemon.call(m, p, b)))
            thread.start()
            threads.append(thread)
            time.sleep(0.5)  # queued in this order behind the domain's lock
    finally:
        os.kill(vm.process.pid, signal.SIGCONT)
    for thread in threads:
        thread.join(timeout=120)
    assert replies["detach"].status == 200, replies["detach"]
    assert replies["copy"].status == 404 and "unknown domain" in replies["copy"].detail
    assert daemon.ok("GET", "/v1/jobs") == [] and vm.cmd("query-block-jobs") == []


def test_requests_on_the_domains_connection_during_pivots_never_leave_the_guest_paused(
        vm_factory: VMFactory, tmp_path: Path) -> None:
    """The daemon shares one QMP connection per domain between a job's driver and the API's
    requests. A `disks` request after another, the whole time, while three pivots run in turn: each
    pivots, journals that blockcopy paused the guest, and resumes it (review of issue 11: an
    observation that counted the requests' messages as the pivot's went out ahead of `stop`)."""
    from blockcopy.records import CopyRequest, Goal
    from blockcopy.service.daemon import Daemon

    vm = vm_factory(1, size=16 * MIB)

    async def main() -> None:
        daemon = Daemon(tmp_path / "daemon-state")
        await daemon.start()
        try:
            await daemon.attach("vm", str(vm.qmp_socket))
            for round_ in range(3):
                op, _ = await daemon.copy(CopyRequest(domain="vm", targets=[("vda", str(tmp_path / f"d{round_}"))]))
                await daemon.wait_for(op.id, lambda o: all(d.job_status == "ready" for d in o.disks))
                asking = asyncio.Event()
                asked = [0]

                async def ask(stop: asyncio.Event = asking, count: list[int] = asked) -> None:
                    while not stop.is_set():
                        await daemon.disks("vm")
                        count[0] += 1

                requests = asyncio.ensure_future(ask())
                try:
                    end = await daemon.conclude(op.id, Goal.PIVOT, wait=True)
                finally:
                    asking.set()
                    await requests
                assert asked[0] > 0
                assert end.outcome is not None and end.outcome.value == "pivoted", end
                assert end.paused_by_us and end.resumed, end
                assert vm.run_state() == "running"
                assert not [s.note for s in daemon.journal.steps(op.id) if "someone else" in s.note]
            # The save that begins a pivot may empty the WAL while its own job holds the domain's
            # pivot guard (the guest still runs); no other save may while a guard is held.
            async with daemon.hubs["vm"].pivot_guard:
                assert daemon.journal.may_checkpoint("vm")
                assert not daemon.journal.may_checkpoint(None) and not daemon.journal.may_checkpoint("other")
        finally:
            daemon.closing = True
            await daemon.close()

    asyncio.run(main())


def test_copy_wait_and_copy_pivot_through_the_daemon_follow_its_event_stream(served: Any, vm_factory: VMFactory,
                                                                           bc: Blockcopy, tmp_path: Path) -> None:
    """The CLI's own HTTP client reads the daemon's chunked event stream: ``copy --wait`` returns once
    ready, ``copy --pivot`` once pivoted, as without the daemon (the same views, the same exit). The
    copies are throttled, so that neither is ready when the client first looks: both must wait on the
    stream. The wait loads none of the core either."""
    daemon = served()
    vms = [vm_factory(1, name=f"vm{i}", size=16 * MIB) for i in range(2)]
    for i, vm in enumerate(vms):
        bc.ok("attach", f"vm{i}", "--qmp", str(vm.qmp_socket))
    vms[0].write_marker("vda", 0x5A, 4 * MIB)
    ready, loaded, streams = _probe(bc, "copy", "vm0", "vda", str(tmp_path / "w.qcow2"), "--wait", "--bandwidth",
                                    "4", "--json")
    assert (loaded, streams) == ([], 1)  # (throttled: not ready when first looked at)
    assert ready["ready_at"] is not None and ready["outcome"] is None and ready["state"] == "ready"
    pivoted, loaded, streams = _probe(bc, "copy", "vm1", "vda", str(tmp_path / "p.qcow2"), "--pivot", "--bandwidth",
                                      "4", "--json")
    assert (loaded, streams) == ([], 1)
    assert pivoted["outcome"] == "pivoted" and pivoted["authoritative"] == "destination"
    assert vms[1].device_node("vda")[0] == f"bc-{pivoted['id']}-0"
    kinds = {(d["job"], k) for _s, k, d in _all_events(daemon)}
    assert {(ready["id"], "ready"), (pivoted["id"], "ready"), (pivoted["id"], "outcome")} <= kinds
    assert bc.ok("pivot", ready["id"], "--json").json["outcome"] == "pivoted"
    assert guest_reads(vms[0], "vda", 0x5A, 4 * MIB)
    assert daemon.stop() == 0


def test_page_cache_fill_reaches_the_journaled_job_through_the_daemon(served: Any, vm_factory: VMFactory,
                                                                      bc: Blockcopy, tmp_path: Path) -> None:
    """`copy --page-cache-fill` through the daemon (its client sends the field only when set, so
    that a daemon older than the option still takes a plain copy) and without it: the journaled
    job says what was asked where it can apply (a job that finishes or pivots from its start); a
    bare copy is told at once that the fill does nothing for it, and is journaled without it (so
    that a pivot asked later does not fill it after all)."""
    from blockcopy.journal import Journal

    served()
    vm = vm_factory(1)
    bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
    for n, (flags, expected, told) in enumerate((([], False, False), (["--page-cache-fill"], False, True),
                                                  (["--page-cache-fill", "--finish"], True, True))):
        job = bc.ok("copy", "vm", "vda", str(tmp_path / f"d{n}.qcow2"), *flags, "--json").json
        journal = Journal(bc.state_dir, create=False)
        try:
            record = journal.get(job["id"])
        finally:
            journal.close()
        assert record is not None and record.page_cache_fill is expected, (flags, record)
        # (this VM's disk is not O_DIRECT: the fill does nothing for it either way, and says so
        # whenever it was asked for; what the journal keeps depends on the goal alone)
        said = [w for w in job["warnings"] if "the page-cache fill (--page-cache-fill) does nothing here" in w]
        assert bool(said) is told, (flags, job["warnings"])
        if job["outcome"] is None:
            bc.ok("abort", job["id"])
