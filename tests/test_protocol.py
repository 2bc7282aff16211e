"""The pure state machine: scenario tables and exhaustive invariants (no QEMU, no I/O)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json

import pytest

from blockcopy.protocol import (
    DUMP_WAIT,
    LIVE_STATUSES,
    MIGRATED_STATES,
    MIGRATION_AFTER_PIVOT,
    MIGRATION_BEGAN,
    MIGRATION_ENDED,
    MIGRATION_WAIT,
    Command,
    Failure,
    JobView,
    Observation,
    Wait,
    decide,
    in_page_cache_while_copying,
    needs,
    page_cache_fill_unused,
    qmp,
)
from blockcopy.records import Authority, CopyRequest, DiskRecord, Goal, Operation, Outcome, Phase, Stage
from blockcopy.views import operation_view

STATUSES = ("created", "running", "ready", "standby", "waiting", "pending", "aborting", "concluded", None)


def disk(i: int, stage: Stage = Stage.STARTED) -> DiskRecord:
    return DiskRecord(name=f"vd{'ab'[i]}", device_key=f"/machine/peripheral/vd{'ab'[i]}/virtio-backend",
                      source_node=f"src{i}", source_file=f"/img/src{i}.qcow2", source_format="qcow2",
                      source_file_node=f"src{i}-file", virtual_size=1 << 30, dest_path=f"/img/dst{i}.qcow2",
                      dest_format="qcow2", dest_node=f"bc-op-{i}", job_id=f"job{i}", stage=stage)


def op(phase: Phase, goal: Goal = Goal.PIVOT, n: int = 1, **kw: object) -> Operation:
    return Operation(id="op", domain="vm", goal=goal, phase=phase, disks=tuple(disk(i) for i in range(n)),
                     **kw)  # type: ignore[arg-type]


def obs(*statuses: str | None, run_state: str = "running", pivoted: tuple[bool, ...] = (),
        errors: tuple[str | None, ...] = (), **kw: object) -> Observation:
    jobs = {f"job{i}": JobView(f"job{i}", s, 10, 10, errors[i] if i < len(errors) else None)
            for i, s in enumerate(statuses) if s is not None}
    devices = {disk(i).device_key: (disk(i).dest_node if i < len(pivoted) and pivoted[i] else f"src{i}")
               for i in range(len(statuses))}
    kw.setdefault("nodes", frozenset({*devices.values(), *(f"bc-op-{i}" for i in range(len(statuses)))}))
    kw.setdefault("dest_state", ("ours",) * len(statuses))  # the driver fills it in CREATE and ADD only
    return Observation(alive=True, run_state=run_state, jobs=jobs, device_nodes=devices,
                       **kw)  # type: ignore[arg-type]


def names(step_commands: tuple[Command, ...]) -> list[str]:
    return [c.name or c.kind for c in step_commands]


# --- scenarios -------------------------------------------------------------------------------------


def test_starting_goes_create_add_mirror_with_write_ahead_records() -> None:
    o = op(Phase.STARTING)
    o = dataclasses.replace(o, disks=(disk(0, Stage.CREATE),))
    step = decide(o, obs(None, dest_state=("absent",)))
    assert names(step.commands) == ["create-image"]
    assert step.record is None, "creating is journaled by the stage itself, before the step"
    assert step.commands[0].after is not None and step.commands[0].after.disks[0].stage is Stage.ADD
    assert step.commands[0].after.disks[0].dest_created
    o = step.commands[0].after
    step = decide(o, obs(None, nodes=frozenset()))
    assert names(step.commands) == ["blockdev-add", "blockdev-mirror"]
    assert step.commands[0].args["backing"] is None  # a full copy never opens a backing named in DEST
    assert step.commands[0].after is None, "the node is re-observable: no record between add and mirror"
    args = step.commands[1].args
    assert args["auto-finalize"] is False and args["auto-dismiss"] is False and args["job-id"] == "job0"
    # A crash between the two: the node is there, the journal still says ADD; it resumes.
    resumed = decide(o, obs(None, nodes=frozenset({"bc-op-0"})))
    assert resumed.record is not None and resumed.record.disks[0].stage is Stage.MIRROR
    assert names(decide(resumed.record, obs(None, nodes=frozenset({"bc-op-0"}))).commands) == ["blockdev-mirror"]
    o = step.commands[1].after
    assert o is not None and o.disks[0].stage is Stage.STARTED
    assert decide(o, obs("running")).record.phase is Phase.COPYING  # type: ignore[union-attr]


@pytest.mark.parametrize(("buf_size", "bandwidth"), [(0, 0), (1 << 20, 8 << 20)])
def test_mirror_carries_the_buffer_size_and_speed_only_when_set(buf_size: int, bandwidth: int) -> None:
    o = dataclasses.replace(op(Phase.STARTING, buf_size=buf_size, bandwidth=bandwidth),
                            disks=(disk(0, Stage.MIRROR),))
    args = decide(o, obs(None)).commands[0].args
    assert args.get("buf-size") == (buf_size or None)  # 0: QEMU's default (records older than the option)
    assert args.get("speed") == (bandwidth or None)


def test_create_stage_refuses_a_file_it_cannot_prove_it_made() -> None:
    o = dataclasses.replace(op(Phase.STARTING), disks=(disk(0, Stage.CREATE),))
    step = decide(o, obs(None, dest_state=("foreign",)))
    assert step.record is not None and step.record.phase is Phase.ABORTING
    assert "is not the file this job created" in (step.record.error or "")
    assert not step.commands


def test_create_stage_goes_on_with_a_file_the_journal_proves_it_made() -> None:
    # Killed after the image was linked into place: the journaled identity matches (issue 9, 6).
    o = dataclasses.replace(op(Phase.STARTING), disks=(disk(0, Stage.CREATE),))
    step = decide(o, obs(None, dest_state=("ours",)))
    assert step.record is not None and step.record.phase is Phase.STARTING
    assert step.record.disks[0].stage is Stage.ADD and step.record.disks[0].dest_created


@pytest.mark.parametrize("state", ["foreign", "absent"])
def test_a_destination_replaced_before_it_is_opened_is_refused(state: str) -> None:
    o = dataclasses.replace(op(Phase.STARTING), disks=(disk(0, Stage.ADD),))
    step = decide(o, obs(None, nodes=frozenset(), dest_state=(state,)))
    assert step.record is not None and step.record.phase is Phase.ABORTING
    assert "refusing to open it" in (step.record.error or "") and not step.commands


@pytest.mark.parametrize("shallow", [False, True])
def test_a_shallow_destination_keeps_its_backing_chain(shallow: bool) -> None:
    # issue 9, 1: `"backing": null` on a shallow DEST made the guest read zeros where its data
    # lives in the base image.
    o = dataclasses.replace(op(Phase.STARTING, shallow=shallow), disks=(disk(0, Stage.ADD),))
    args = decide(o, obs(None, nodes=frozenset())).commands[0].args
    assert ("backing" in args) is not shallow


def test_recovery_of_start_skips_steps_qemu_shows_done() -> None:
    o = dataclasses.replace(op(Phase.STARTING), disks=(disk(0, Stage.ADD),))
    step = decide(o, obs(None))  # node exists already (obs lists bc-op-0)
    assert step.record is not None and step.record.disks[0].stage is Stage.MIRROR and not step.commands


def test_copying_waits_then_follows_the_goal() -> None:
    assert decide(op(Phase.COPYING), obs("running")).wait is Wait.COPY
    assert decide(op(Phase.COPYING, Goal.COPY), obs("ready")).wait is Wait.COPY
    step = decide(op(Phase.COPYING), obs("ready"))
    assert step.record is not None and step.record.phase is Phase.PIVOTING
    assert step.record.paused_by_us and step.record.vm_was_running
    step = decide(op(Phase.COPYING), obs("ready", run_state="paused"))
    assert step.record is not None and not step.record.paused_by_us
    step = decide(op(Phase.COPYING, Goal.FINISH), obs("ready"))
    assert step.record is not None and step.record.phase is Phase.FINISHING


def _direct_dest(i: int, aio: str = "threads") -> DiskRecord:
    """A DEST journaled with the source's libvirt-style options: O_DIRECT on both nodes."""
    args = {"driver": "qcow2", "node-name": f"bc-op-{i}", "cache": {"direct": True, "no-flush": False},
            "file": {"driver": "file", "node-name": f"bc-op-{i}-file", "filename": "/dev/fdset/7", "aio": aio,
                     "cache": {"direct": True, "no-flush": False}}}
    return dataclasses.replace(disk(i), dest_args=args)


def test_a_direct_destination_is_filled_through_the_page_cache_then_reopened_before_the_pivot() -> None:
    o = dataclasses.replace(op(Phase.STARTING, page_cache_fill=True),
                            disks=(dataclasses.replace(_direct_dest(0), stage=Stage.ADD),))
    added = decide(o, obs(None, nodes=frozenset())).commands[0].args
    assert added["cache"]["direct"] is False and added["file"]["cache"]["direct"] is False
    assert added["file"]["aio"] == "threads" and added["file"]["filename"] == "/dev/fdset/7"
    assert in_page_cache_while_copying(o, o.disks[0]), "so the driver writes it out while copying"
    o = dataclasses.replace(op(Phase.COPYING, n=2, page_cache_fill=True), disks=(_direct_dest(0), _direct_dest(1)))
    buffered = {"bc-op-0": (False, "json:{...}"), "bc-op-0-file": (False, "/dev/fdset/7"),
                "bc-op-1": (True, "json:{...}"), "bc-op-1-file": (True, "/dev/fdset/8")}
    assert decide(o, obs("ready", "running", node_cache=buffered)).wait is Wait.COPY, "not before every job is ready"
    step = decide(o, obs("ready", "ready", node_cache=buffered))
    assert step == decide(o, _restricted(o, obs("ready", "ready", node_cache=buffered))), "needs() names 'nodes'"
    assert "nodes" not in needs(dataclasses.replace(o, goal=Goal.FINISH)), "not read on every poll of a finish"
    assert step.record is None, "a reopen is re-observable: nothing to journal"
    assert names(step.commands) == ["blockdev-reopen"], "only the DEST that is still buffered"
    assert step.commands[0].args == {"options": [
        {"driver": "qcow2", "node-name": "bc-op-0", "cache": {"direct": True, "no-flush": False},
         "file": "bc-op-0-file"},
        {"driver": "file", "node-name": "bc-op-0-file", "filename": "/dev/fdset/7", "aio": "threads",
         "cache": {"direct": True, "no-flush": False}}]}
    direct = {**buffered, "bc-op-0": (True, ""), "bc-op-0-file": (True, "/dev/fdset/7")}
    step = decide(o, obs("ready", "ready", node_cache=direct))
    assert step.record is not None and step.record.phase is Phase.PIVOTING
    # A reopen QEMU refuses gives the copy up with the reason, before the guest is touched.
    refused = Failure(qmp("blockdev-reopen", {}), "Could not reopen file: Invalid argument")
    step = decide(o, obs("ready", "ready", node_cache=buffered, failure=refused))
    assert step.record is not None and step.record.phase is Phase.ABORTING and "O_DIRECT" in (step.record.error or "")


@pytest.mark.parametrize("case", ["finish", "copy", "aio-native", "not-direct"])
def test_no_reopen_when_the_destination_is_not_kept(case: str) -> None:
    dest = _direct_dest(0, aio="native" if case == "aio-native" else "threads")
    if case == "not-direct":
        dest = dataclasses.replace(disk(0), dest_args={"driver": "qcow2", "node-name": "bc-op-0",
                                                         "file": {"driver": "file", "filename": "/dev/fdset/7"}})
    goal = {"finish": Goal.FINISH, "copy": Goal.COPY}.get(case, Goal.PIVOT)
    o = dataclasses.replace(op(Phase.COPYING, goal), disks=(dest,))
    direct = case == "aio-native"  # added O_DIRECT, as journaled
    step = decide(o, obs("ready", node_cache={"bc-op-0": (direct, ""), "bc-op-0-file": (direct, "/dev/fdset/7")}))
    assert not step.commands
    if case == "copy":  # kept ready as it is; reopened when it is pivoted
        assert step.record is None and step.wait is Wait.COPY
        return
    assert step.record is not None
    assert step.record.phase is (Phase.FINISHING if case == "finish" else Phase.PIVOTING)
    if case == "aio-native":  # aio=native needs O_DIRECT from the start: added as journaled
        start = dataclasses.replace(o, phase=Phase.STARTING, disks=(dataclasses.replace(dest, stage=Stage.ADD),))
        assert decide(start, obs(None, nodes=frozenset())).commands[0].args["cache"]["direct"] is True


def test_a_reopen_ends_when_every_node_has_its_journaled_cache_mode() -> None:
    # Only the file node is O_DIRECT on the source (a hand-written command line): DEST's format node
    # stays buffered, as journaled, and the reopen must not be sent again once the file node is direct.
    dest = _direct_dest(0)
    args = {**dict(dest.dest_args or {}), "cache": {"direct": False, "no-flush": False}}
    o = dataclasses.replace(op(Phase.COPYING), disks=(dataclasses.replace(dest, dest_args=args),))
    step = decide(o, obs("ready", node_cache={"bc-op-0": (False, ""), "bc-op-0-file": (False, "/dev/fdset/7")}))
    assert names(step.commands) == ["blockdev-reopen"]
    step = decide(o, obs("ready", node_cache={"bc-op-0": (False, ""), "bc-op-0-file": (True, "/dev/fdset/7")}))
    assert not step.commands and step.record is not None and step.record.phase is Phase.PIVOTING
    # A reopen that QEMU accepts but that does not take: given up once stalled, before the pause.
    stuck = decide(o, obs("ready", stalled=True,
                          node_cache={"bc-op-0": (False, ""), "bc-op-0-file": (False, "/dev/fdset/7")}))
    assert stuck.record is not None and stuck.record.phase is Phase.ABORTING


@pytest.mark.parametrize("case", ["default", "copy-goal", "shallow", "block-device"])
def test_a_direct_destination_is_added_o_direct_unless_a_page_cache_fill_is_asked_for_and_can_be_written_back(
        case: str) -> None:
    """By default (``page_cache_fill`` False) as the source, O_DIRECT from the start; asked for, the
    fill through the page cache is still not done where nothing would write the page cache back."""
    dest = dataclasses.replace(_direct_dest(0), stage=Stage.ADD)
    if case == "block-device":
        args = dict(dest.dest_args or {})
        args["file"] = {**args["file"], "driver": "host_device", "filename": "/dev/fdset/7"}
        dest = dataclasses.replace(dest, dest_args=args)
    o = dataclasses.replace(op(Phase.STARTING, Goal.COPY if case == "copy-goal" else Goal.PIVOT,
                               shallow=case == "shallow", page_cache_fill=case != "default"), disks=(dest,))
    added = decide(o, obs(None, nodes=frozenset())).commands[0].args
    assert added["cache"]["direct"] is True and added["file"]["cache"]["direct"] is True
    # an O_DIRECT DEST has nothing to write out; one of a fill asked for under another goal is written
    # out all the same (the goal may have been pivot when it was added: see the test below)
    assert in_page_cache_while_copying(o, o.disks[0]) is (case == "copy-goal")


@pytest.mark.parametrize("case", ["applies", "finish", "not-asked", "copy-goal", "shallow", "block-device",
                                  "aio-native", "source-buffered", "buffered-bare"])
def test_a_page_cache_fill_that_would_do_nothing_is_said_with_its_reason(case: str) -> None:
    """`--page-cache-fill` is never a silent no-op: where a DEST would not be filled through the page
    cache, the plan warns with the reason; exactly where the protocol does fill it, nothing is said."""
    dest = dataclasses.replace(_direct_dest(0), stage=Stage.ADD)
    args = dict(dest.dest_args or {})
    if case == "block-device":
        args["file"] = {**args["file"], "driver": "host_device"}
    if case == "aio-native":
        args["file"] = {**args["file"], "aio": "native"}
    if case in ("source-buffered", "buffered-bare"):
        args = {**args, "cache": {"direct": False, "no-flush": False},
                "file": {**args["file"], "cache": {"direct": False, "no-flush": False}}}
    goal = {"copy-goal": Goal.COPY, "buffered-bare": Goal.COPY, "finish": Goal.FINISH}.get(case, Goal.PIVOT)
    o = dataclasses.replace(op(Phase.STARTING, goal, shallow=case == "shallow", page_cache_fill=case != "not-asked"),
                            disks=(dataclasses.replace(dest, dest_args=args),))
    reason = page_cache_fill_unused(o, o.disks[0])
    added = decide(o, obs(None, nodes=frozenset())).commands[0].args
    filled = added["file"]["cache"]["direct"] is False and added["cache"]["direct"] is False
    assert (reason is None) is (case in ("applies", "finish", "not-asked")), reason
    assert filled is (case in ("applies", "finish", "source-buffered", "buffered-bare")), added
    # (a bare copy of a DEST that is not to be O_DIRECT is told that, not that it is O_DIRECT)
    expected = {"copy-goal": "to pivot or finish", "shallow": "shallow", "block-device": "host_device",
                "aio-native": "aio=native", "source-buffered": "not to be O_DIRECT",
                "buffered-bare": "not to be O_DIRECT"}.get(case)
    assert expected is None or (reason is not None and expected in reason), reason


def test_a_destination_in_the_page_cache_by_its_own_options_is_written_out_while_copying() -> None:
    buffered = dataclasses.replace(disk(0), dest_args={"driver": "qcow2", "node-name": "bc-op-0",
                                                         "file": {"driver": "file", "filename": "/dev/fdset/7"}})
    assert in_page_cache_while_copying(op(Phase.COPYING), buffered)
    assert in_page_cache_while_copying(op(Phase.COPYING), disk(0)), "default options (no dest_args): page cache"
    # O_DIRECT above, buffered file node (a hand-written command line): the file is in the page cache.
    args = dict(_direct_dest(0).dest_args or {})
    args["file"] = {**args["file"], "cache": {"direct": False, "no-flush": False}}
    assert in_page_cache_while_copying(op(Phase.COPYING), dataclasses.replace(disk(0), dest_args=args))
    # ... and a file node that inherits O_DIRECT from the format node is not.
    args["file"] = {k: v for k, v in args["file"].items() if k != "cache"}
    assert not in_page_cache_while_copying(op(Phase.COPYING), dataclasses.replace(disk(0), dest_args=args))


@pytest.mark.parametrize("goal", [Goal.PIVOT, Goal.COPY])
def test_a_page_cache_fill_is_written_out_whatever_the_goal_is_now(goal: Goal) -> None:
    """The goal that decided how DEST was added may have changed since (an interrupted `copy --pivot`
    keeps the copy as goal copy): a fill asked for is written out either way, and without one the
    reopen's node query is not made on every poll."""
    o = dataclasses.replace(op(Phase.COPYING, goal, page_cache_fill=True), disks=(_direct_dest(0),))
    assert in_page_cache_while_copying(o, o.disks[0])
    assert ("nodes" in needs(o)) is (goal is Goal.PIVOT)
    plain = dataclasses.replace(o, page_cache_fill=False)
    assert not in_page_cache_while_copying(plain, plain.disks[0]) and "nodes" not in needs(plain)


def test_a_record_journaled_before_page_cache_fill_existed_goes_on_filling_through_the_page_cache() -> None:
    """A job started by a blockcopy that filled every such DEST through the page cache keeps doing so
    after an upgrade (it may be in STARTING, its DEST not added yet); a new record says what it says."""
    record = op(Phase.STARTING).to_dict()
    assert Operation.from_dict(record).page_cache_fill is False
    del record["page_cache_fill"]
    assert Operation.from_dict(record).page_cache_fill is True


def test_finalizing_waits_after_a_refused_finalize_and_stops_stuck_when_stalled() -> None:
    o = op(Phase.FINALIZING, n=2, paused_by_us=True, vm_was_running=True)
    refused = Failure(qmp("job-finalize", {"id": "job1"}, disk=1), "cannot finalize")
    step = decide(o, obs("concluded", "pending", run_state="paused", pivoted=(True, False), failure=refused))
    assert names(step.commands) == ["job-finalize"] and step.wait is Wait.SETTLE and not step.observe_at_once
    step = decide(o, obs("concluded", "pending", run_state="paused", pivoted=(True, False), stalled=True,
                         failure=refused))
    assert step.stuck is not None and not step.commands and step.record is None, "no going back, no outcome guessed"
    step = decide(o, obs("concluded", "running", run_state="paused", pivoted=(True, False), stalled=True))
    assert step.stuck is not None
    # A refusal that comes when every job has concluded (a finalize sent twice) is no reason to stop.
    step = decide(o, obs("concluded", "concluded", run_state="paused", pivoted=(True, True), stalled=True,
                         failure=refused))
    assert step.stuck is None and step.record is not None and step.record.outcome is Outcome.PIVOTED


def test_two_disks_pivot_only_when_both_are_ready() -> None:
    assert decide(op(Phase.COPYING, n=2), obs("ready", "running")).wait is Wait.COPY


def test_pivot_pauses_then_completes_then_finalizes_all() -> None:
    o = op(Phase.PIVOTING, n=2, paused_by_us=True, vm_was_running=True)
    assert names(decide(o, obs("ready", "ready")).commands) == ["sync-images", "stop", "job-complete",
                                                                "job-complete"]
    assert names(decide(o, obs("ready", "ready", run_state="paused")).commands) == ["job-complete"] * 2
    # Observed right behind the job-completes (QEMU 7.2 is pending by then), finalized right behind.
    assert decide(o, obs("ready", "ready")).observe_at_once
    assert decide(o, obs("ready", "ready", run_state="paused")).observe_at_once
    assert decide(o, obs("pending", "waiting", run_state="paused")).wait is Wait.SETTLE
    step = decide(o, obs("pending", "pending", run_state="paused"))
    assert names(step.commands) == ["job-finalize"] * 2 and step.observe_at_once
    assert step.record is not None and step.record.phase is Phase.FINALIZING, "journaled before the first finalize"
    step = decide(step.record, obs("concluded", "concluded", run_state="paused", pivoted=(True, True)))
    assert step.record is not None and step.record.outcome is Outcome.PIVOTED
    assert names(step.commands) == ["cont"], "resumed right after the outcome is journaled"


def test_a_pivot_interrupted_between_finalizes_goes_forward() -> None:
    # Crash after the first job-finalize: one device switched, the other job is still pending.
    f = op(Phase.FINALIZING, n=2, paused_by_us=True, vm_was_running=True)
    step = decide(f, obs("concluded", "pending", run_state="paused", pivoted=(True, False)))
    assert names(step.commands) == ["job-finalize"] and step.commands[0].args == {"id": "job1"}
    # With the guest resumed by someone: a switched device cannot be rolled back.
    ob = obs("concluded", "pending", run_state="running", pivoted=(True, False))
    assert names(decide(f, ob).commands) == ["job-finalize"]
    # Once the time is up (finalizes QEMU ignored): nothing rolled back, no outcome guessed, the
    # command ends (the driver reports the guest left paused) and `recover` goes on.
    step = decide(f, obs("concluded", "pending", run_state="paused", pivoted=(True, False), stalled=True))
    assert step.stuck is not None and not step.commands and step.record is None
    # A device switched while the journal says PIVOTING (another client's finalize): journal first.
    p = dataclasses.replace(f, phase=Phase.PIVOTING)
    step = decide(p, obs("concluded", "pending", run_state="paused", pivoted=(True, False)))
    assert step.record is not None and step.record.phase is Phase.FINALIZING and not step.commands


def test_qemu_gone_after_finalize_with_differing_images_names_no_image() -> None:
    # The data-loss case of issue 9's review: finalize went out, someone resumed the guest, it wrote
    # to DEST, QEMU exited. The source is not the image with its latest writes; nothing tells which is.
    f = op(Phase.FINALIZING, n=2, paused_by_us=False)
    assert names(decide(f, Observation(alive=False)).commands) == ["compare-images"]
    step = decide(f, Observation(alive=False, identical=(True, False)))
    assert step.record is not None and step.record.phase is Phase.DONE
    assert step.record.outcome is Outcome.FAILED and step.record.authoritative is Authority.UNKNOWN
    assert "cannot tell" in (step.record.reason or "")
    step = decide(f, Observation(alive=False, identical=(True, True)))
    assert step.record is not None and step.record.authoritative is Authority.BOTH
    # Before FINALIZING no finalize was sent: differing images mean the source is newer.
    p = dataclasses.replace(f, phase=Phase.PIVOTING)
    step = decide(p, Observation(alive=False, identical=(True, False)))
    assert step.record is not None and step.record.authoritative is Authority.SOURCE


def test_a_finalize_that_fails_before_any_device_switched_pivots_no_disk() -> None:
    o = op(Phase.PIVOTING, n=2, paused_by_us=True, vm_was_running=True)
    step = decide(o, obs("concluded", "pending", run_state="paused", errors=("permission conflict", None)))
    assert step.record is not None and step.record.phase is Phase.ABORTING
    assert names(decide(step.record, obs("concluded", "pending", run_state="paused")).commands) == ["job-cancel"]


def test_a_job_failing_before_finalize_means_no_disk_pivots() -> None:
    o = op(Phase.PIVOTING, n=2, paused_by_us=True)
    step = decide(o, obs("pending", "concluded", run_state="paused", errors=(None, "I/O error")))
    assert step.record is not None and step.record.phase is Phase.ABORTING
    assert "no disk pivoted" in (step.record.error or "")
    aborting = step.record
    step = decide(aborting, obs("pending", "concluded", run_state="paused", errors=(None, "I/O error")))
    assert names(step.commands) == ["job-cancel"] and step.commands[0].args == {"id": "job0"}


def test_outcome_comes_from_query_block_not_from_job_status() -> None:
    # A cancelled mirror can conclude without error; only query-block tells whether it pivoted.
    f = op(Phase.FINALIZING, paused_by_us=True)
    step = decide(f, obs("concluded", run_state="paused", pivoted=(False,)))
    assert step.record is not None and step.record.outcome is Outcome.FAILED
    assert step.record.authoritative is Authority.SOURCE
    step = decide(f, obs("concluded", run_state="paused", pivoted=(True,)))
    assert step.record is not None and step.record.outcome is Outcome.PIVOTED
    assert step.record.authoritative is Authority.DESTINATION


def test_partial_pivot_is_reported_per_disk() -> None:
    f = op(Phase.FINALIZING, n=2)
    step = decide(f, obs("concluded", "concluded", pivoted=(True, False), errors=(None, "boom")))
    assert step.record is not None and step.record.outcome is Outcome.FAILED
    assert step.record.authoritative is Authority.MIXED
    assert [d.pivoted for d in step.record.disks] == [True, False]


def test_settling_resumes_only_what_blockcopy_paused() -> None:
    s = op(Phase.SETTLING, outcome=Outcome.PIVOTED, authoritative=Authority.DESTINATION, paused_by_us=True)
    step = decide(s, obs("concluded", run_state="paused", pivoted=(True,)))
    assert names(step.commands) == ["cont"] and step.commands[0].after is not None
    user = dataclasses.replace(s, paused_by_us=False)
    step = decide(user, obs("concluded", run_state="paused", pivoted=(True,)))
    assert "cont" not in names(step.commands)


def test_settling_cleans_up_old_source_after_a_pivot_and_dest_after_none() -> None:
    s = op(Phase.SETTLING, outcome=Outcome.PIVOTED, authoritative=Authority.DESTINATION)
    s = s.with_disk(0, pivoted=True)
    o = obs(None, pivoted=(True,), nodes=frozenset({"bc-op-0", "src0", "src0-file"}))
    step = decide(s, o)
    assert step.commands[0].args == {"node-name": "src0"}
    o = dataclasses.replace(o, nodes=frozenset({"bc-op-0", "src0-file"}))
    assert decide(s, o).commands[0].args == {"node-name": "src0-file"}
    n = op(Phase.SETTLING, outcome=Outcome.NOT_PIVOTED, authoritative=Authority.SOURCE).with_disk(0, pivoted=False)
    assert decide(n, obs(None)).commands[0].args == {"node-name": "bc-op-0"}


def test_settling_cleans_every_disk_in_one_step_then_ends_with_one_record() -> None:
    s = op(Phase.SETTLING, n=2, outcome=Outcome.PIVOTED, authoritative=Authority.DESTINATION)
    s = s.with_disk(0, pivoted=True).with_disk(1, pivoted=True)
    o = obs("concluded", "concluded", pivoted=(True, True),
            nodes=frozenset({"bc-op-0", "bc-op-1", "src0", "src0-file", "src1", "src1-file"}))
    step = decide(s, o)
    # Top nodes first, one per disk and step: a protocol node defined inline goes with its parent.
    assert [(c.name, c.args) for c in step.commands] == [
        ("job-dismiss", {"id": "job0"}), ("blockdev-del", {"node-name": "src0"}),
        ("job-dismiss", {"id": "job1"}), ("blockdev-del", {"node-name": "src1"})]
    step = decide(s, obs(None, None, pivoted=(True, True),
                         nodes=frozenset({"bc-op-0", "bc-op-1", "src0-file", "src1-file"})))
    assert [(c.name, c.args) for c in step.commands] == [
        ("blockdev-del", {"node-name": "src0-file"}), ("blockdev-del", {"node-name": "src1-file"})]
    assert step.record is None and all(c.purpose == "cleanup" for c in step.commands)
    step = decide(s, obs(None, None, pivoted=(True, True), nodes=frozenset({"bc-op-0", "bc-op-1"})))
    assert step.record is not None and step.record.phase is Phase.DONE and not step.commands
    assert all(d.cleaned for d in step.record.disks)


def test_refused_cleanup_becomes_a_warning_not_a_loop() -> None:
    s = op(Phase.SETTLING, outcome=Outcome.PIVOTED, authoritative=Authority.DESTINATION).with_disk(0, pivoted=True)
    failed = qmp("blockdev-del", {"node-name": "src0"}, disk=0, purpose="cleanup")
    step = decide(s, obs(None, pivoted=(True,), failure=Failure(failed, "in use")))
    assert step.record is not None and step.record.disks[0].cleaned and step.record.warnings


def test_qemu_gone_before_pivot_means_source() -> None:
    step = decide(op(Phase.COPYING), Observation(alive=False))
    assert step.record is not None and step.record.phase is Phase.DONE
    assert step.record.outcome is Outcome.NOT_PIVOTED and step.record.authoritative is Authority.SOURCE
    assert "QEMU exited while copying" in (step.record.reason or "")
    failing = op(Phase.ABORTING, error="disk vda: I/O error")
    step = decide(failing, Observation(alive=False))
    assert step.record is not None and step.record.outcome is Outcome.FAILED
    assert step.record.error == "disk vda: I/O error"


def test_qemu_gone_mid_pivot_compares_images() -> None:
    p = op(Phase.PIVOTING, paused_by_us=True)
    step = decide(p, Observation(alive=False))
    assert names(step.commands) == ["compare-images"] and step.record is None
    step = decide(p, Observation(alive=False, identical=(True,)))
    assert step.record is not None and step.record.authoritative is Authority.BOTH
    step = decide(p, Observation(alive=False, identical=(False,)))
    assert step.record is not None and step.record.authoritative is Authority.SOURCE


def test_qemu_gone_after_the_outcome_keeps_it() -> None:
    s = op(Phase.SETTLING, outcome=Outcome.PIVOTED, authoritative=Authority.DESTINATION, paused_by_us=True)
    step = decide(s, Observation(alive=False))
    assert step.record is not None and step.record.outcome is Outcome.PIVOTED
    assert step.record.phase is Phase.DONE and step.record.warnings


def test_stalled_pivot_rolls_back_instead_of_leaving_the_guest_paused() -> None:
    p = op(Phase.PIVOTING, paused_by_us=True)
    step = decide(p, obs("waiting", run_state="paused", stalled=True))
    assert step.record is not None and step.record.phase is Phase.ABORTING


def test_every_job_pending_wins_over_a_stalled_clock() -> None:
    # issue 9, 3: once all jobs are pending the pivot goes on, however long it took to get there.
    p = op(Phase.PIVOTING, n=2, paused_by_us=True)
    step = decide(p, obs("pending", "pending", run_state="paused", stalled=True))
    assert names(step.commands) == ["job-finalize"] * 2
    assert step.record is not None and step.record.phase is Phase.FINALIZING


def test_no_finalize_while_someone_else_resumed_the_guest() -> None:
    # issue 9, 8: finalizing a running guest lets it write to DEST before the outcome is journaled.
    for paused_by_us in (True, False):
        p = op(Phase.PIVOTING, n=2, paused_by_us=paused_by_us)
        step = decide(p, obs("pending", "pending", run_state="running"))
        assert "job-finalize" not in names(step.commands)
        assert step.record is not None and step.record.phase is Phase.ABORTING
        assert "resumed by someone else" in (step.record.error or "")


def test_a_guest_resumed_before_the_jobs_are_completed_is_paused_by_blockcopy() -> None:
    p = op(Phase.PIVOTING, paused_by_us=False, vm_was_running=False)
    step = decide(p, obs("ready", run_state="running"))
    assert step.record is not None and step.record.paused_by_us and not step.commands
    assert names(decide(step.record, obs("ready", run_state="running")).commands) == [
        "sync-images", "stop", "job-complete"]


def test_finish_claims_a_consistent_copy_only_once_qemu_closed_the_destination() -> None:
    f = op(Phase.FINISHING, Goal.FINISH, n=2)
    assert names(decide(f, obs("ready", "ready")).commands) == ["block-job-cancel"] * 2
    # Seen ending cleanly: journaled as a fact, not yet a claim.
    step = decide(f, obs("concluded", "concluded"))
    assert step.record is not None and step.record.outcome is None and not step.commands
    assert [(d.mirror_ended, d.consistent) for d in step.record.disks] == [(True, None), (True, None)]
    ended = step.record
    # Then QEMU flushes and closes DEST (qcow2 metadata may live in its cache until then) ...
    step = decide(ended, obs("concluded", "concluded"))
    assert [(c.name, c.args) for c in step.commands] == [
        ("job-dismiss", {"id": "job0"}), ("blockdev-del", {"node-name": "bc-op-0"}),
        ("job-dismiss", {"id": "job1"}), ("blockdev-del", {"node-name": "bc-op-1"})]
    # ... and blockcopy fsyncs each DEST file (QEMU ignores a failed flush on close).
    closed = obs(None, None, nodes=frozenset({"src0", "src1"}))
    step = decide(ended, closed)
    assert [(c.kind, c.disk) for c in step.commands] == [("sync-dest", 0)] and step.record is None
    after = step.commands[0].after
    assert after is not None and [d.consistent for d in after.disks] == [True, None]
    assert [(c.kind, c.disk) for c in decide(after, closed).commands] == [("sync-dest", 1)]
    synced = ended.with_disk(0, consistent=True).with_disk(1, consistent=True)
    step = decide(synced, closed)
    assert step.record is not None and step.record.outcome is Outcome.NOT_PIVOTED
    assert [d.consistent for d in step.record.disks] == [True, True]
    assert "consistent copy" in (step.record.reason or "") and "NOT" not in (step.record.reason or "")
    # A crash between dismissing and deleting: the journal says the mirror ended cleanly.
    half = obs(None, None, nodes=frozenset({"src0", "src1", "bc-op-1"}))
    assert [(c.name, c.args) for c in decide(ended, half).commands] == [("blockdev-del", {"node-name": "bc-op-1"})]
    # QEMU refuses to close one, or the fsync fails: that one is not claimed.
    for failed in (qmp("blockdev-del", {"node-name": "bc-op-1"}, disk=1), Command("sync-dest", disk=1)):
        step = decide(ended, dataclasses.replace(half, failure=Failure(failed, "I/O error")))
        assert step.record is not None and [d.consistent for d in step.record.disks] == [None, False]
        assert step.record.warnings and step.record.outcome is None


def test_qemu_gone_before_it_closed_the_destination_claims_no_consistent_copy() -> None:
    ended = op(Phase.FINISHING, Goal.FINISH).with_disk(0, mirror_ended=True)
    step = decide(ended, Observation(alive=False))
    assert step.record is not None and step.record.phase is Phase.DONE
    assert [d.consistent for d in step.record.disks] == [False]


def test_a_stalled_finish_is_cancelled_and_never_claims_a_consistent_copy() -> None:
    # issue 9, 2: it used to be journaled "consistent" while the job still ran in QEMU.
    f = op(Phase.FINISHING, Goal.FINISH, n=2)
    step = decide(f, obs("ready", "concluded", stalled=True))
    assert step.record is not None and step.record.forced and step.record.phase is Phase.FINISHING
    assert step.record.outcome is None and not step.commands, "journaled before the force-cancel"
    forced = step.record
    step = decide(forced, obs("ready", "concluded"))
    assert names(step.commands) == ["job-cancel"] and step.commands[0].args == {"id": "job0"}
    assert decide(forced, obs("aborting", "concluded")).wait is Wait.SETTLE
    step = decide(forced, obs("concluded", "concluded", errors=("Operation canceled", None)))
    assert step.record is not None and step.record.outcome is Outcome.NOT_PIVOTED
    assert step.record.authoritative is Authority.SOURCE
    assert [d.consistent for d in step.record.disks] == [False, False]
    assert "NOT a consistent copy" in (step.record.reason or "")
    # Force-cancelled and still not ending: the operation stays unfinished, nothing is claimed.
    stuck = decide(forced, obs("aborting", "concluded", stalled=True))
    assert stuck.stuck and stuck.record is None and not stuck.commands and not stuck.terminal


def test_an_abort_that_qemu_is_slow_to_carry_out_resumes_the_guest_but_is_not_done() -> None:
    a = op(Phase.ABORTING, n=2, paused_by_us=True, error="pivot failed")
    step = decide(a, obs("aborting", "pending", run_state="paused", stalled=True))
    assert step.record is not None and step.record.phase is Phase.SETTLING
    assert step.record.outcome is Outcome.FAILED and step.record.authoritative is Authority.SOURCE
    assert names(step.commands) == ["cont"], "no device can switch any more: resume"
    settling = dataclasses.replace(step.record, resumed=True)
    step = decide(settling, obs("aborting", "pending"))
    assert names(step.commands) == ["job-cancel"] and step.commands[0].args == {"id": "job1"}
    assert decide(settling, obs("aborting", "aborting")).wait is Wait.SETTLE
    stuck = decide(settling, obs("aborting", "aborting", stalled=True))
    assert stuck.stuck and stuck.record is None


def test_late_duplicate_job_complete_refusal_is_ignored() -> None:
    p = op(Phase.PIVOTING, paused_by_us=True)
    refused = Failure(qmp("job-complete", {"id": "job0"}, disk=0), "not in ready state")
    step = decide(p, obs("waiting", run_state="paused", failure=refused))
    assert step.record is None and step.wait is Wait.SETTLE
    step = decide(p, obs("ready", run_state="paused", failure=refused))
    assert step.record is not None and step.record.phase is Phase.ABORTING


# --- exhaustive invariants -------------------------------------------------------------------------

PHASES = [p for p in Phase if p is not Phase.DONE]


FAILURES = (None, "stop", "stop-migration", "job-complete", "job-finalize", "job-cancel", "block-job-cancel", "cont",
            "cleanup")


def _failure(kind: str | None) -> Failure | None:
    if kind is None:
        return None
    if kind == "cleanup":
        return Failure(qmp("blockdev-del", {"node-name": "src0"}, disk=0, purpose="cleanup"), "in use")
    if kind == "stop-migration":  # the driver's own refusal, nothing sent (a migration began)
        return Failure(qmp("stop"), MIGRATION_BEGAN)
    return Failure(qmp(kind, {"id": "job0"}, disk=0), "refused")


def _cases() -> list[tuple[Operation, Observation]]:
    cases = []
    for phase, goal, paused_by_us, (s0, s1), (run_state, migration), piv in itertools.product(
            PHASES, list(Goal), (False, True), itertools.product(STATUSES, repeat=2), RUN_AND_MIGRATION,
            ((False, False), (True, True), (True, False))):
        outcome = Outcome.PIVOTED if phase is Phase.SETTLING else None
        authority = Authority.DESTINATION if outcome else None
        o = op(phase, goal, n=2, paused_by_us=paused_by_us, outcome=outcome, authoritative=authority)
        cases.append((o, obs(s0, s1, run_state=run_state, pivoted=piv, migration=migration)))
        if phase is Phase.COPYING:  # journaled while a dump or a migration held the pivot (and with a speed to set)
            for speed_applied, held_by in itertools.product((True, False), (DUMP_WAIT, MIGRATION_WAIT)):
                cases.append((dataclasses.replace(o, waiting=held_by, speed_applied=speed_applied),
                              obs(s0, s1, run_state=run_state, pivoted=piv, migration=migration)))
    return cases


#: run state x query-migrate status: no migration, a memory dump, one running, one switching over
#: (QEMU sets COMPLETED before the run state moves on), a VM migrated away, one resumed here after
#: it, and a guest reset while stopped (prelaunch)
RUN_AND_MIGRATION = (("running", "none"), ("paused", "none"), ("save-vm", "none"), ("running", "active"),
                     ("paused", "active"), ("finish-migrate", "completed"), ("postmigrate", "completed"),
                     ("postmigrate", "failed"), ("running", "completed"), ("prelaunch", "none"),
                     ("prelaunch", "completed"))
CASES = _cases()


def _failure_cases() -> list[tuple[Operation, Observation]]:
    """The same, crossed with the failure dimensions: a refused command, a stalled transition, a
    forced finish, a resumed guest, errors on the jobs."""
    cases = []
    for phase, paused_by_us, (s0, s1), run_state, piv, failure, stalled, forced, errors in itertools.product(
            PHASES, (False, True), itertools.product(("ready", "pending", "waiting", "aborting", "concluded", None),
                                                     repeat=2),
            ("running", "paused"), ((False, False), (True, False)), FAILURES, (False, True), (False, True),
            ((None, None), ("Operation canceled", None))):
        goal = Goal.FINISH if phase is Phase.FINISHING else Goal.PIVOT
        if paused_by_us and phase in (Phase.STARTING, Phase.COPYING, Phase.FINISHING):
            continue  # only a pivot pauses the guest
        if forced and phase is not Phase.FINISHING:
            continue
        outcome = Outcome.NOT_PIVOTED if phase is Phase.SETTLING else None
        o = op(phase, goal, n=2, paused_by_us=paused_by_us, forced=forced, outcome=outcome,
               authoritative=Authority.SOURCE if outcome else None,
               resumed=phase is Phase.SETTLING and not paused_by_us)
        cases.append((o, obs(s0, s1, run_state=run_state, pivoted=piv, failure=_failure(failure), stalled=stalled,
                             errors=errors)))
    return cases


FAILURE_CASES = _failure_cases()


def _check_invariants(o: Operation, ob: Observation) -> None:
    step = decide(o, ob)
    cmds = names(step.commands)
    where = (f"{o.phase} goal={o.goal} paused_by_us={o.paused_by_us} forced={o.forced} {dict(ob.jobs)} "
             f"{ob.run_state} migration={ob.migration} stalled={ob.stalled} failure={ob.failure}")
    migrating = ob.migration not in MIGRATION_ENDED or ob.run_state in MIGRATED_STATES
    # What the journal says when the commands run: a step's record is written first.
    journaled = step.record if step.record is not None else o
    live = [j for j in ob.jobs.values() if j.status in LIVE_STATUSES | {"aborting"}]
    # The guest is resumed only once the outcome is journaled, only if blockcopy paused it, and only
    # while it is still paused (one that a migration took over would run on both sides).
    if "cont" in cmds:
        assert journaled.outcome is not None and journaled.paused_by_us, where
        assert ob.run_state == "paused" or (ob.run_state == "prelaunch" and ob.migration in ("none", "failed",
                                                                                              "cancelled")), where
    # blockcopy pauses only in PIVOTING, and only a guest it decided to pause.
    if "stop" in cmds:
        assert journaled.phase is Phase.PIVOTING and journaled.paused_by_us, where
        assert cmds.index("sync-images") < cmds.index("stop"), where
    # Point of no return only once every job is pending and the guest is not running, or once a
    # device has switched (a finalize went out before); or when finishing without pivot.
    if "job-finalize" in cmds:
        # The point of no return is journaled before it (FINALIZING), or it is a finish.
        assert journaled.phase in (Phase.FINALIZING, Phase.FINISHING), where
        if o.phase is Phase.PIVOTING:
            assert all(j.status == "pending" for j in ob.jobs.values()) and len(ob.jobs) == 2, where
            assert ob.run_state != "running", where
    if "job-complete" in cmds:
        assert o.phase is Phase.PIVOTING, where
    # A memory dump holds the guest paused and resumes it at its end, whenever: no pivot starts or
    # goes on to its point of no return under one.
    if ob.run_state == "save-vm" and o.phase in (Phase.COPYING, Phase.PIVOTING) and not any(
            _uses(ob, d) for d in o.disks):
        assert not {"job-complete", "job-finalize", "stop"} & set(cmds), where
        assert step.record is None or step.record.phase is not Phase.PIVOTING or o.phase is Phase.PIVOTING, where
        assert step.record is None or step.record.phase is not Phase.FINALIZING, where
    if step.record is not None:
        assert step.record.id == o.id and step.record.domain == o.domain
    # what held a ready copy (`waiting`, for `status`) is said only while copying, and only of a
    # pivot a memory dump holds: in the step's record and in the records its commands journal after
    for record in (step.record, *(c.after for c in step.commands)):
        assert record is None or not record.waiting or (
            record.phase is Phase.COPYING and record.goal is Goal.PIVOT
            and (ob.run_state == "save-vm" or migrating)), where
    # A migration takes the guest to a QEMU that opens what its own command line names: no pivot
    # begins while one runs or once it has taken the guest away (COPYING waits; PIVOTING does not
    # read query-migrate, the pause counts: the driver looks right before `stop` and refuses it
    # then, and the run state of a switch-over is read), and a guest it stopped is never resumed.
    if o.phase is Phase.COPYING and migrating and o.goal is Goal.PIVOT:
        assert step.record is None or step.record.phase in (Phase.COPYING, Phase.ABORTING), where
    began = ob.failure is not None and ob.failure.message == MIGRATION_BEGAN
    if o.phase is Phase.PIVOTING and (began or ob.run_state in MIGRATED_STATES) and not any(
            _uses(ob, d) for d in o.disks):
        assert not {"stop", "job-complete", "job-finalize", "cont"} & set(cmds), where
        assert step.record is not None and step.record.phase in (Phase.COPYING, Phase.ABORTING), where
        assert not step.record.paused_by_us, where
        if all(j.status == "ready" for j in ob.jobs.values()) and len(ob.jobs) == 2:
            assert step.record.phase is Phase.COPYING, where
    if step.record is not None:
        if step.record.outcome is not None:
            assert step.record.authoritative is not None, where
        # DONE means nothing of the operation runs in QEMU any more.
        if step.record.phase is Phase.DONE:
            assert not live, where
        # A mirror is recorded as ended cleanly only when seen concluded without error, in a finish
        # that was not forced; a consistent copy is never claimed by a decision alone (only after
        # QEMU closed DEST and blockcopy's fsync of it succeeded: a command's after-record).
        for d, before in zip(step.record.disks, o.disks, strict=True):
            if d.mirror_ended and not before.mirror_ended:
                job = ob.jobs.get(d.job_id)
                assert not step.record.forced and job is not None and job.status == "concluded" and not job.error, \
                    where
            assert not (d.consistent and not before.consistent), where
    for command in step.commands:
        if command.after is not None and any(d.consistent for d in command.after.disks):
            assert command.kind == "sync-dest", where
    if step.stuck is not None:
        # Given up only where nothing can be decided, with nothing changed, and never while a guest
        # that blockcopy paused waits for an outcome.
        assert step.record is None and not step.commands, where
        assert o.outcome is not None or o.phase in (Phase.FINISHING, Phase.FINALIZING), where
        # In FINALIZING only after the time limit (the driver then reports the guest left paused).
        assert not (o.paused_by_us and not o.resumed and o.outcome is None) or o.phase is Phase.FINALIZING, where
        assert o.phase is not Phase.FINALIZING or ob.stalled, where
    # Every non-terminal step makes progress: a record, a command, a wait, or gives up.
    assert step.record is not None or step.commands or step.wait is not None or step.stuck, where


def test_invariants_hold_for_every_phase_status_and_run_state() -> None:
    assert len(CASES) > 10_000
    for o, ob in CASES:
        _check_invariants(o, ob)


def test_invariants_hold_across_failures_stalls_and_resumed_guests() -> None:
    assert len(FAILURE_CASES) > 40_000
    for o, ob in FAILURE_CASES:
        _check_invariants(o, ob)


def test_pivoting_never_rolls_back_a_switched_device() -> None:
    for o, ob in CASES:
        if o.phase is not Phase.PIVOTING or not any(n.startswith("bc-") for n in ob.device_nodes.values()):
            continue
        step = decide(o, ob)
        assert "job-cancel" not in names(step.commands), (o, ob)
        assert step.record is None or step.record.phase is not Phase.ABORTING, (o, ob)


@pytest.mark.parametrize("phase", PHASES)
def test_qemu_gone_always_ends_with_an_authoritative_image(phase: Phase) -> None:
    o = op(phase, paused_by_us=True, outcome=Outcome.PIVOTED if phase is Phase.SETTLING else None,
           authoritative=Authority.DESTINATION if phase is Phase.SETTLING else None)
    step = decide(o, Observation(alive=False))
    if step.commands:
        step = decide(o, Observation(alive=False, identical=(True,)))
    assert step.record is not None and step.record.phase is Phase.DONE
    assert step.record.authoritative is not None and step.record.outcome is not None
    assert decide(step.record, Observation(alive=False)).terminal


def _restricted(o: Operation, ob: Observation) -> Observation:
    """What the driver observes: only the queries that needs() names."""
    wanted = needs(o)
    return dataclasses.replace(
        ob, run_state=ob.run_state if "status" in wanted else "",
        migration=ob.migration if "migration" in wanted else "",
        jobs=ob.jobs if "jobs" in wanted else {},
        device_nodes=ob.device_nodes if "block" in wanted else {},
        nodes=ob.nodes if "nodes" in wanted else frozenset(),
        node_cache=ob.node_cache if "nodes" in wanted or "graph" in wanted else {},
        device_images=ob.device_images if "graph" in wanted else {},
        unused_fdsets=ob.unused_fdsets if "fdsets" in wanted else frozenset())


def test_needs_names_everything_each_decision_reads() -> None:
    for o, ob in [*CASES, *FAILURE_CASES]:
        ended = o.with_disk(0, consistent=True).with_disk(1, consistent=True)  # a finish closing DEST
        for record in (o, dataclasses.replace(o, resumed=True), ended):
            assert decide(record, _restricted(record, ob)) == decide(record, ob), (record.phase, dict(ob.jobs))


def test_pivot_syncs_images_before_stopping_the_guest() -> None:
    o = op(Phase.PIVOTING, paused_by_us=True)
    assert names(decide(o, obs("ready")).commands) == ["sync-images", "stop", "job-complete"]


@pytest.mark.parametrize("phase", PHASES)
def test_qemu_gone_never_names_an_image_the_journal_cannot_vouch_for(phase: Phase) -> None:
    """QEMU gone, across paused/not, outcome journaled or not, and every comparison result: the
    image named holds the guest's acknowledged writes, or none is named ('unknown')."""
    for paused_by_us, identical, journaled in itertools.product(
            (False, True), (None, (True, True), (True, False), (False, False)), (False, True)):
        outcome = Outcome.PIVOTED if journaled else None
        o = op(phase, n=2, paused_by_us=paused_by_us, outcome=outcome,
               authoritative=Authority.DESTINATION if journaled else None)
        step = decide(o, Observation(alive=False, identical=identical))
        where = (phase, paused_by_us, identical, journaled)
        if step.commands:
            assert [c.kind for c in step.commands] == ["compare-images"] and identical is None, where
            assert phase in (Phase.PIVOTING, Phase.FINALIZING) and not journaled, where
            continue
        record = step.record
        assert record is not None and record.phase is Phase.DONE and record.outcome is not None, where
        if journaled:
            assert record.authoritative is Authority.DESTINATION, where  # the outcome stands
        elif record.authoritative is Authority.BOTH:
            assert identical is not None and all(identical), where
        elif phase is Phase.FINALIZING:
            # a device may have switched and the guest may have run: only identical images vouch
            assert record.authoritative is Authority.UNKNOWN and record.outcome is Outcome.FAILED, where
        else:
            # no job-finalize went out: the source holds every acknowledged write
            assert record.authoritative is Authority.SOURCE, where


def test_settling_deletes_the_old_chain_one_node_per_step_top_first() -> None:
    d = dataclasses.replace(disk(0), pivoted=True, source_below=("src0-file", "base0", "base0-file"))
    s = dataclasses.replace(op(Phase.SETTLING, outcome=Outcome.PIVOTED, authoritative=Authority.DESTINATION,
                               resumed=True), disks=(d,))
    left = ["src0", "src0-file", "base0", "base0-file"]
    for expected in list(left):
        step = decide(s, obs(None, pivoted=(True,), nodes=frozenset({"bc-op-0", *left})))
        assert [c.args for c in step.commands] == [{"node-name": expected}]
        left.remove(expected)
    step = decide(s, obs(None, pivoted=(True,), nodes=frozenset({"bc-op-0"})))
    assert step.record is not None and step.record.phase is Phase.DONE


def test_a_backing_node_two_disks_shared_is_deleted_once() -> None:
    disks = tuple(dataclasses.replace(disk(i), pivoted=True, source_below=(f"src{i}-file", "base", "base-file"))
                  for i in range(2))
    s = dataclasses.replace(op(Phase.SETTLING, outcome=Outcome.PIVOTED, authoritative=Authority.DESTINATION,
                               resumed=True, n=2), disks=disks)
    nodes = frozenset({"bc-op-0", "bc-op-1", "base", "base-file"})
    step = decide(s, obs(None, None, pivoted=(True, True), nodes=nodes))
    assert [(c.disk, c.args["node-name"]) for c in step.commands] == [(0, "base")]



def test_a_request_digest_is_unchanged_by_a_field_left_at_its_default_that_later_versions_added() -> None:
    """A client retries a request under its idempotency key after an upgrade: the same request must
    hash the same, so a field added since (page_cache_fill) counts only when it is set."""
    request = CopyRequest(domain="vm", targets=[("vda", "/d.qcow2")], goal=Goal.PIVOT, client_key="k")
    before = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)
              if f.name not in ("client_key", "page_cache_fill")}
    before.update(targets=[["vda", "/d.qcow2"]], goal="pivot", dest_options={})
    digest = hashlib.sha256(json.dumps(before, sort_keys=True, default=str).encode()).hexdigest()
    assert request.digest() == digest, "the digest of the same request as journaled before the field existed"
    assert dataclasses.replace(request, page_cache_fill=True).digest() != digest, "a different request"


def test_a_refused_stop_with_the_jobs_pending_and_the_guest_running_gives_the_pivot_up_and_says_why() -> None:
    """The job-completes went right behind a `stop` that QEMU refused (a memory dump that started
    after blockcopy looked): the jobs are pending, the guest runs; finalizing would pivot a running
    guest. Given up, no disk pivoted, with QEMU's reason (not "resumed by someone else")."""
    o = op(Phase.PIVOTING, paused_by_us=True, vm_was_running=True)
    refused = Failure(qmp("stop"), "There is a dump in process, please wait.")
    step = decide(o, obs("pending", run_state="running", failure=refused))
    assert step.record is not None and step.record.phase is Phase.ABORTING
    assert "QEMU refused to pause the guest" in (step.record.error or "") and "dump" in (step.record.error or "")
    plain = decide(o, obs("pending", run_state="running"))
    assert plain.record is not None and "resumed by someone else" in (plain.record.error or "")


def _uses(ob: Observation, d: DiskRecord) -> bool:
    return ob.device_nodes.get(d.device_key) == d.dest_node


def test_a_pivot_that_a_memory_dump_overtakes_goes_back_to_copying_or_is_given_up() -> None:
    """A dump that begins after the copy's last look (PIVOTING journaled): with every job still
    ready, back to copying until the dump ends; with one completed, the pivot is given up; a
    job-complete that lands in copying afterwards cancels the copy (a pending mirror holds writes)."""
    o = op(Phase.PIVOTING, paused_by_us=True, vm_was_running=True)
    back = decide(o, obs("ready", run_state="save-vm"))
    assert back.record is not None and back.record.phase is Phase.COPYING and not back.commands
    assert not back.record.paused_by_us
    gone = decide(o, obs("pending", run_state="save-vm"))
    assert gone.record is not None and gone.record.phase is Phase.ABORTING
    assert "memory dump" in (gone.record.error or "")
    landed = decide(op(Phase.COPYING), obs("pending", run_state="running"))
    assert landed.record is not None and landed.record.phase is Phase.ABORTING


def test_a_pivot_does_not_begin_while_a_memory_dump_holds_the_guest_paused() -> None:
    """A detached dump-guest-memory pauses the guest (`save-vm`) and resumes it when it ends, at any
    moment: a pivot begun then would take that pause for its user's, pause nothing itself, and the
    dump's end could resume the guest between job-finalize and the outcome's record. COPYING waits."""
    o = op(Phase.COPYING)
    step = decide(o, obs("ready", run_state="save-vm"))
    # the wait is journaled once, for `status` and the event stream; nothing else is decided on it
    assert step.record is not None and not step.commands and step.wait is Wait.COPY
    assert step.record.phase is Phase.COPYING and "memory dump" in step.record.waiting
    waiting = step.record
    again = decide(waiting, obs("ready", run_state="save-vm"))
    assert again.record is None and not again.commands and again.wait is Wait.COPY
    after = decide(waiting, obs("ready", run_state="running"))
    assert after.record is not None and after.record.phase is Phase.PIVOTING and after.record.paused_by_us
    assert after.record.waiting == ""
    # the goal changed meanwhile (a wait interrupted keeps the copy): nothing holds the copy any more
    kept = decide(dataclasses.replace(waiting, goal=Goal.COPY), obs("ready", run_state="save-vm"))
    assert kept.record is not None and kept.record.waiting == "" and kept.record.phase is Phase.COPYING
    assert decide(kept.record, obs("ready", run_state="save-vm")).record is None
    aborted = decide(dataclasses.replace(waiting, goal=Goal.ABORT), obs("ready", run_state="save-vm"))
    assert aborted.record is not None and aborted.record.phase is Phase.ABORTING and aborted.record.waiting == ""
    # a mirror that leaves `ready` for a moment while the dump lasts does not end the wait (no
    # record each way, no event each way)
    assert decide(waiting, obs("standby", run_state="save-vm")).record is None
    # the dump ended while the jobs are not all ready: said once
    ended = decide(waiting, obs("running", run_state="running"))
    assert ended.record is not None and ended.record.waiting == "" and ended.record.phase is Phase.COPYING
    # what the view shows: only while a pivot is held (not after an interrupted wait made the goal copy)
    assert "memory dump" in (operation_view(waiting)["waiting"] or "")
    assert operation_view(dataclasses.replace(waiting, goal=Goal.COPY))["waiting"] is None
    finish = decide(op(Phase.COPYING, Goal.FINISH), obs("ready", run_state="save-vm"))
    assert finish.record is not None and finish.record.phase is Phase.FINISHING, "a finish does not touch the guest"


def test_a_migration_that_runs_after_the_pivot_is_reported_once() -> None:
    """One that began inside the pivot (too late to hold it): once the outcome is `pivoted`, the job
    says so in its warnings, once, with what to do; a job that did not pivot says nothing of it."""
    done = op(Phase.SETTLING, outcome=Outcome.PIVOTED, authoritative=Authority.DESTINATION, resumed=True)
    step = decide(done, obs("concluded", pivoted=(True,), migration="active"))
    assert step.record is not None and step.record.warnings == (MIGRATION_AFTER_PIVOT,) and not step.commands
    assert "migrate_cancel" in MIGRATION_AFTER_PIVOT
    again = decide(step.record, obs("concluded", pivoted=(True,), migration="active"))
    assert again.record is None or again.record.warnings == (MIGRATION_AFTER_PIVOT,)
    assert names(again.commands) == ["job-dismiss"]  # the cleanup goes on
    not_pivoted = dataclasses.replace(done, outcome=Outcome.NOT_PIVOTED, authoritative=Authority.SOURCE)
    assert MIGRATION_AFTER_PIVOT not in (decide(not_pivoted, obs("concluded", migration="active")).record
                                         or not_pivoted).warnings


def test_a_guest_blockcopy_paused_is_never_resumed_once_a_migration_took_it_over() -> None:
    """blockcopy's `stop` went out (stop_ts journaled), then a migration switched the guest over:
    the pivot is given up with the job-completes already sent (not back to copying), the guest is
    not resumed (a `cont` in postmigrate re-activates the images and runs it here as well as on the
    other side), and the job says so, with what to do. The same at the outcome: `cont` only to a
    guest still paused; SETTLING tells what became of any other."""
    paused = op(Phase.PIVOTING, paused_by_us=True, stop_ts=1.0)
    for run_state in ("finish-migrate", "postmigrate"):
        step = decide(paused, obs("ready", run_state=run_state))
        assert step.record is not None and step.record.phase is Phase.ABORTING and not step.commands
        assert not step.record.paused_by_us and "migration" in (step.record.error or "")
        assert any(run_state in w and "resume it where it runs now" in w for w in step.record.warnings)
    # (nothing sent yet: back to copying, which waits the migration out)
    assert decide(op(Phase.PIVOTING, paused_by_us=True), obs("ready", run_state="postmigrate")).record.phase \
        is Phase.COPYING  # type: ignore[union-attr]
    finalizing = op(Phase.FINALIZING, paused_by_us=True, stop_ts=1.0)
    concluded = decide(finalizing, obs("concluded", pivoted=(True,), run_state="postmigrate"))
    assert concluded.record is not None and concluded.record.outcome is Outcome.PIVOTED
    assert "cont" not in names(concluded.commands)
    settled = decide(concluded.record, obs("concluded", pivoted=(True,), run_state="postmigrate",
                                           migration="completed"))
    assert settled.record is not None and "cont" not in names(settled.commands) and settled.record.resumed
    assert any("postmigrate" in w and "does not resume it" in w for w in settled.record.warnings)
    # still paused: resumed with the outcome, as ever
    normal = decide(finalizing, obs("concluded", pivoted=(True,), run_state="paused"))
    assert names(normal.commands) == ["cont"]


def test_a_guest_reset_during_blockcopys_pause_is_resumed() -> None:
    """QEMU 7.2 puts a guest reset while stopped (`system_reset`, `virsh reset`, or the guest's
    own reboot request handled during the pause) in `prelaunch`, from which `cont` runs it. A guest
    blockcopy paused is resumed from there right after the outcome (review 38: it was left
    stopped, with a warning blaming a migration), once query-migrate says no migration completed:
    QEMU also lets a migrated-away VM be reset into prelaunch (review 40)."""
    finalizing = op(Phase.FINALIZING, paused_by_us=True, stop_ts=1.0)
    concluded = decide(finalizing, obs("concluded", pivoted=(True,), run_state="prelaunch"))
    assert concluded.record is not None and concluded.record.outcome is Outcome.PIVOTED
    assert "cont" not in names(concluded.commands) and not concluded.record.warnings  # (no migration status yet)
    assert needs(concluded.record) >= {"status", "migration"}
    step = decide(concluded.record, obs("concluded", pivoted=(True,), run_state="prelaunch", migration="none"))
    assert names(step.commands) == ["cont"]
    migrated = decide(concluded.record, obs("concluded", pivoted=(True,), run_state="prelaunch",
                                            migration="completed"))
    assert "cont" not in names(migrated.commands) and migrated.record is not None
    assert any("prelaunch" in w and "does not resume it" in w for w in migrated.record.warnings)
    # a guest the user had paused (and reset) is left as it is
    theirs = decide(op(Phase.FINALIZING), obs("concluded", pivoted=(True,), run_state="prelaunch"))
    assert "cont" not in names(theirs.commands)


def test_a_user_paused_guest_resumed_after_some_jobs_were_completed_gives_the_pivot_up_at_once() -> None:
    """The jobs already pending hold their disks' writes; the pivot could only be given up once all
    were (finalizing would let the guest write to DEST before the outcome is journaled), so it is
    given up at once, sending no further job-complete (review 41: one more went out, with the
    guest running)."""
    users = op(Phase.PIVOTING, n=2)
    step = decide(users, obs("pending", "ready", run_state="running"))
    assert step.record is not None and step.record.phase is Phase.ABORTING and not step.commands
    assert "resumed by someone else" in (step.record.error or "")
    # blockcopy's own pause, undone by someone: paused again, as before
    ours = decide(op(Phase.PIVOTING, n=2, paused_by_us=True), obs("pending", "ready", run_state="running"))
    assert "stop" in names(ours.commands)


def test_a_suspended_guest_is_pivoted_as_one_its_user_paused() -> None:
    """README (Known limits): QEMU 7.2's `stop` does not hold a guest suspended to RAM, so
    blockcopy sends none and resumes nothing; should the guest wake with jobs pending, the pivot is
    given up (review 42: `suspended` was in no protocol test)."""
    copying = op(Phase.COPYING, Goal.PIVOT)
    begin = decide(copying, obs("ready", run_state="suspended", migration="none"))
    assert begin.record is not None and begin.record.phase is Phase.PIVOTING and not begin.record.paused_by_us
    step = decide(begin.record, obs("ready", run_state="suspended"))
    assert names(step.commands) == ["job-complete"]
    finalize = decide(begin.record, obs("pending", run_state="suspended"))
    assert finalize.record is not None and finalize.record.phase is Phase.FINALIZING
    concluded = decide(finalize.record, obs("concluded", pivoted=(True,), run_state="suspended"))
    assert "cont" not in names(concluded.commands)
    woke = decide(op(Phase.PIVOTING, n=2), obs("pending", "ready", run_state="running"))
    assert woke.record is not None and woke.record.phase is Phase.ABORTING


def test_the_wait_for_a_migration_says_what_holds_it() -> None:
    """Running, switched over, migrated away, or left stopped by a migration that did not finish:
    each says what to do, and a change of reason is journaled."""
    copying = op(Phase.COPYING)
    texts = {}
    for run_state, migration in (("running", "active"), ("postmigrate", "completed"), ("postmigrate", "failed")):
        step = decide(copying, obs("ready", run_state=run_state, migration=migration))
        assert step.record is not None and step.record.phase is Phase.COPYING and not step.commands
        texts[(run_state, migration)] = step.record.waiting
        assert "migrat" in step.record.waiting and ("cont" in step.record.waiting or "migrate_cancel" in
                                                     step.record.waiting)
    assert len(set(texts.values())) == 3
    assert "exits" in texts[("postmigrate", "completed")] and "did not finish" in texts[("postmigrate", "failed")]
    held = decide(copying, obs("ready", run_state="running", migration="active")).record
    assert held is not None
    changed = decide(held, obs("ready", run_state="postmigrate", migration="completed"))
    assert changed.record is not None and changed.record.waiting == texts[("postmigrate", "completed")]


def test_a_pivot_whose_completes_went_out_is_given_up_under_a_migration_even_without_a_stop_time() -> None:
    """The stop's time is not journaled before the next record (a crash may lose it): jobs that
    left `ready` also show that blockcopy's stop and completes went out. A refusal by the look
    before `stop` (nothing sent, the guest ran) goes back to copying without a word of a pause."""
    paused = op(Phase.PIVOTING, paused_by_us=True)  # no stop_ts
    step = decide(paused, obs("pending", run_state="postmigrate"))
    assert step.record is not None and step.record.phase is Phase.ABORTING and not step.record.paused_by_us
    assert any("postmigrate" in w and "does not resume it" in w for w in step.record.warnings)
    refused = Failure(qmp("stop"), f"QEMU refused stop: {MIGRATION_BEGAN}")
    back = decide(dataclasses.replace(paused, stop_ts=5.0), obs("ready", failure=refused))
    assert back.record is not None and back.record.phase is Phase.COPYING and not back.record.warnings
