"""The copy-and-pivot protocol as a pure state machine.

Theory of operation
===================

blockcopy never remembers anything in memory that it could not rebuild after a ``kill -9``. At any
moment the truth is the pair (journal record, what QEMU reports now). :func:`decide` maps that pair
to the next :class:`Step`; a thin driver (:mod:`blockcopy.driver`) performs the step and asks again.
Normal operation and crash recovery are therefore the same code: recovery is just "observe, decide"
starting from whatever the journal last said.

A step has up to three parts, performed in this order:

1. ``record``: a new journal record, written and fsynced *before* anything else (write-ahead);
2. ``commands``: QMP commands or image operations; a command may carry an ``after`` record that is
   journaled once the command has succeeded (used where a result cannot be re-observed, such as
   "blockcopy created this file");
3. ``wait``: how to wait for QEMU before the next observation (``SETTLE``: a job transition that
   takes milliseconds; ``COPY``: the mirror converging, which can take hours).

Phases (``op.phase``) and what moves them, given the observation (``obs``):

============  =================================================================  ===========
phase         does                                                               next
============  =================================================================  ===========
STARTING      per disk: create DEST, then blockdev-add + blockdev-mirror          COPYING
COPYING       sends a journaled speed change (``block-job-set-speed``) until    PIVOTING,
              QEMU took it; waits until every job is ``ready``; then, for a      FINISHING,
              pivot, ``blockdev-reopen`` of a DEST filled through the page       ABORTING
              cache (``page_cache_fill``) with its journaled cache mode
              (re-observed, no record); then follows ``op.goal`` (a pivot
              not while a memory dump holds the guest, ``save-vm``, nor while
              a migration runs or has stopped the guest here: it waits)
PIVOTING      one step: fsync the images, ``stop`` a running VM (its run state   FINALIZING,
              was journaled on entry), ``job-complete`` each job; then waits     ABORTING
              until *every* job is ``pending`` (all or nothing) with the guest   or COPYING
              not running; back to COPYING if a memory dump or a migration
              began while every job is still ready (and, for a migration,
              before blockcopy's ``stop`` went out), ABORTING after
FINALIZING    journaled, then in the same step ``job-finalize`` each: the       SETTLING
              point of no return; only goes forward from here; outcome from
              ``query-block``
FINISHING     ``block-job-cancel`` of ready jobs (no pivot; DEST consistent),    SETTLING
              then ``job-finalize``
ABORTING      ``job-cancel`` every job; outcome not-pivoted or failed            SETTLING
SETTLING      the outcome record is written, and in the same step ``cont`` if    DONE
              blockcopy paused the VM and it is still paused (any other run
              state: a warning, no ``cont``); then, each step for all disks,
              ``job-dismiss`` and ``blockdev-del`` of one node no device uses
              (top first), then ``remove-fd`` of unused fd sets
DONE          nothing
============  =================================================================  ===========

Failure rules:
- a job that fails, vanishes or is cancelled by someone else before any device has switched to its
  DEST sends the operation to ABORTING with an error, which cancels the other jobs: no disk
  pivots; once one device has switched, the pivot only goes forward;
- QEMU gone before the outcome is journaled (outcome ``not-pivoted``; ``failed`` if a job had
  already failed): before FINALIZING no ``job-finalize`` was sent, so the guest cannot have written
  to DEST through a pivot, and the *source* holds every acknowledged write. In PIVOTING the images
  are compared and ``both`` is recorded when identical. In FINALIZING a device may have switched:
  identical images give ``both``; images that differ mean the guest ran after the pivot began,
  which only someone else's ``cont`` allows (blockcopy resumes it only after the outcome is
  journaled; a guest the user paused is the user's), and then which image it wrote to last is
  unknown: outcome ``failed``, authoritative ``unknown``, never a guess;
- QEMU gone after the outcome is journaled: the outcome stands.

The outcome is always decided from ``query-block`` (which node the device uses), never from job
status: a cancelled mirror can conclude without error and not pivot.

While the guest is paused every QMP round trip counts, so :func:`needs` tells the driver which
queries each phase's decision reads (a test checks, over every case, that nothing else is read),
and steps carry several commands where the outcome of the first cannot change the decision.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from blockcopy.records import Authority, DiskRecord, Goal, Operation, Outcome, Phase, Stage

#: QEMU job statuses (qapi/job.json JobStatus) in which the job still runs or can be driven.
LIVE_STATUSES = frozenset({"created", "running", "paused", "ready", "standby", "waiting", "pending"})


@dataclass(frozen=True)
class JobView:
    """One entry of ``query-jobs``."""

    id: str
    status: str
    current: int = 0
    total: int = 0
    error: str | None = None


@dataclass(frozen=True)
class Failure:
    """A command of the previous step that QEMU (or the file system) refused."""

    command: Command
    message: str


@dataclass(frozen=True)
class Observation:
    """What QEMU reports now, plus the few facts outside QEMU that decisions need."""

    alive: bool
    run_state: str = "running"  # query-status "status"
    #: query-migrate "status" ("none": no migration ever); read only while a pivot is wanted
    #: (``needs``: "migration"), "" when not read
    migration: str = ""
    jobs: Mapping[str, JobView] = field(default_factory=dict)
    device_nodes: Mapping[str, str] = field(default_factory=dict)  # device_key -> root node name
    #: device_key -> the node right below the device's filters (x-debug-query-block-graph); read
    #: only for disks with filters above the image (``DiskRecord.replaces``)
    device_images: Mapping[str, str] = field(default_factory=dict)
    nodes: frozenset[str] = frozenset()  # every named node (query-named-block-nodes)
    unused_fdsets: frozenset[int] = frozenset()  # blockcopy's fd sets that no node uses (query-fdsets)
    #: node name -> (cache.direct, the file it opened), from query-named-block-nodes ("nodes")
    node_cache: Mapping[str, tuple[bool, str]] = field(default_factory=dict)
    #: per disk, in Stage.CREATE and Stage.ADD only: what DEST's path names now. "absent"; "ours":
    #: the file whose identity the record journaled; "foreign": anything else (another file, a
    #: symlink swapped in, a file that blockcopy cannot prove it made).
    dest_state: tuple[str, ...] = ()
    failure: Failure | None = None  # the previous step's refused command, if any
    identical: tuple[bool, ...] | None = None  # per disk, result of a CompareImages command
    #: no step made progress for the transition time limit while waiting for QEMU to finish a
    #: transition that takes milliseconds (the driver's clock starts after a step's commands)
    stalled: bool = False


class Wait(enum.Enum):
    SETTLE = "settle"  # a job or run-state transition that QEMU finishes by itself, quickly
    COPY = "copy"  # the mirror copying or converging: as long as the storage takes


@dataclass(frozen=True)
class Command:
    """An effect for the driver: a QMP command, or an image operation (``kind`` other than qmp)."""

    #: "qmp"; "add-dest": blockdev-add of DEST, opened by blockcopy and passed to QEMU as a file
    #: descriptor once it proved to be the journaled file; "create-image", "compare-images",
    #: "sync-images", "sync-dest"
    kind: str
    name: str = ""  # QMP command name
    args: Mapping[str, Any] = field(default_factory=dict)
    disk: int | None = None
    after: Operation | None = None  # journaled once the command succeeded
    purpose: str = ""  # "cleanup" failures are warnings, not errors
    #: send at most once per Manager (its drivers, or the daemon's, share what they sent):
    #: repeating it could change its meaning (a second soft cancel of a mirror that has meanwhile
    #: left `ready` is a hard one). After a crash it is sent again, once, since nothing says whether
    #: it went out.
    once: bool = False

    def describe(self) -> str:
        if self.kind == "qmp":
            return f"{self.name} {dict(self.args)}" if self.args else self.name
        return f"{self.kind} disk {self.disk}"


def qmp(name: str, args: Mapping[str, Any] | None = None, *, disk: int | None = None,
        after: Operation | None = None, purpose: str = "", once: bool = False) -> Command:
    return Command("qmp", name, dict(args or {}), disk=disk, after=after, purpose=purpose, once=once)


@dataclass(frozen=True)
class Step:
    record: Operation | None = None
    commands: tuple[Command, ...] = ()
    wait: Wait | None = None
    note: str = ""
    #: QEMU does not carry out a transition that cannot be given up: the operation stays unfinished
    #: (journal as is) and the driver stops with this message; the next command or `recover` retries.
    stuck: str | None = None
    #: The next observation goes out right behind the commands, in the same pipeline, instead of
    #: after their answers: one round trip less while the guest is paused. QEMU answers in order,
    #: so the queries see what the commands did by then. ``job-finalize`` swaps the nodes before
    #: its answer. After ``job-complete`` a mirror with nothing left to copy turns ``pending`` a
    #: moment later, before QEMU has read the queries behind it (it reads commands a byte per
    #: main-loop iteration; tests/test_driver.py shows it). An observation that comes too early
    #: shows the jobs on their way; the driver then waits for QEMU's next event after the queries
    #: went out, and observes again.
    observe_at_once: bool = False

    @property
    def terminal(self) -> bool:
        return self.record is None and not self.commands and self.wait is None and self.stuck is None


DONE_STEP = Step(note="done")


#: What each phase's decision reads from QEMU. The driver queries only these, which keeps the
#: observations inside the guest's pause short (each query is a QMP round trip).
ALL_QUERIES = frozenset({"status", "jobs", "block", "nodes", "fdsets", "migration"})
_NEEDS = {
    Phase.STARTING: frozenset({"jobs", "nodes"}),
    Phase.COPYING: frozenset({"status", "jobs", "block"}),  # + "nodes" before a pivot's reopen (needs())
    Phase.PIVOTING: frozenset({"status", "jobs", "block"}),
    # forward only; the run state says whether the guest blockcopy paused may be resumed (``cont``
    # goes only to a guest still paused: one a migration took over would run on both sides)
    Phase.FINALIZING: frozenset({"status", "jobs", "block"}),
    Phase.FINISHING: frozenset({"status", "jobs", "block", "nodes"}),
    Phase.ABORTING: frozenset({"status", "jobs", "block"}),
    Phase.SETTLING: ALL_QUERIES,
    Phase.DONE: frozenset(),
}


def needs(op: Operation) -> frozenset[str]:
    """The QEMU queries whose answers :func:`decide` reads for ``op`` now."""
    if op.phase is Phase.SETTLING and op.paused_by_us and not op.resumed:
        # resume first, as fast as possible; clean up afterwards (query-migrate: see resumable)
        return frozenset({"status", "migration"})
    wanted = _NEEDS[op.phase]
    if (op.phase is Phase.COPYING and op.goal is Goal.PIVOT and op.page_cache_fill
            and any(_wants_direct(d) for d in op.disks)):
        # each node's cache mode, for the reopen (not on every poll otherwise; without a page-cache
        # fill DEST was added with its journaled cache mode and is never reopened)
        wanted = wanted | {"nodes"}
    if op.phase is Phase.COPYING and op.goal is Goal.PIVOT:
        wanted = wanted | {"migration"}  # a pivot waits out a migration (not read inside the pause)
    if "block" in wanted and any(d.replaces for d in op.disks):
        wanted = wanted | {"graph"}  # which image a filter sits on: only the block graph says
    return wanted


def decide(op: Operation, obs: Observation) -> Step:
    """The next step for ``op`` given ``obs``. Pure: no I/O, no clock."""
    if op.phase is Phase.DONE:
        return DONE_STEP
    if not obs.alive:
        return _qemu_gone(op, obs)
    return _HANDLERS[op.phase](op, obs)


# --- helpers -------------------------------------------------------------------------------------


def _replace(op: Operation, **changes: Any) -> Operation:
    if changes.get("phase", Phase.COPYING) is not Phase.COPYING:
        changes.setdefault("waiting", "")  # (what held a ready copy holds nothing once it moves on)
    return dataclasses.replace(op, **changes)


def _abort(op: Operation, error: str) -> Step:
    return Step(record=_replace(op, phase=Phase.ABORTING, error=op.error or error),
                note=f"abort: {error}")


def _job(op: Operation, obs: Observation, disk: DiskRecord) -> JobView | None:
    return obs.jobs.get(disk.job_id)


def _job_trouble(op: Operation, obs: Observation) -> str | None:
    """Why a job cannot reach its goal any more: its disk was unplugged, or the job vanished, failed,
    or was concluded/cancelled by others."""
    for disk in op.disks:
        if disk.device_key not in obs.device_nodes:  # COPYING and PIVOTING read query-block
            return (f"disk {disk.name} was unplugged from the guest; the copy is cancelled and the source keeps "
                    "its data")
        job = _job(op, obs, disk)
        if job is None:
            return f"disk {disk.name}: job {disk.job_id} disappeared from QEMU"
        if job.status in ("concluded", "null", "aborting"):
            why = job.error or "it ended without blockcopy asking"
            return f"disk {disk.name}: mirror job {job.status}: {why}"
    return None


def _uses_dest(obs: Observation, disk: DiskRecord) -> bool:
    """The device uses DEST: as its root node, or, below its filters, as the image they sit on."""
    if disk.replaces:
        return obs.device_images.get(disk.device_key) == disk.dest_node
    return obs.device_nodes.get(disk.device_key) == disk.dest_node


def _conclude(op: Operation, obs: Observation, *, on_success: Outcome, reason: str,
              job_errors_fail: bool = True) -> Step:
    """Journal the outcome, decided from which node each device uses now.

    ``job_errors_fail`` is False when blockcopy cancelled the jobs itself: their "Operation
    canceled" errors are expected then.
    """
    pivoted = [_uses_dest(obs, d) for d in op.disks]
    errors = [f"disk {d.name}: {j.error}" for d in op.disks
              if (j := _job(op, obs, d)) is not None and j.error]
    if not job_errors_fail:
        errors = []
    record = op
    for index, flag in enumerate(pivoted):
        record = record.with_disk(index, pivoted=flag)
    if all(pivoted):
        outcome, authority, error = Outcome.PIVOTED, Authority.DESTINATION, None
        reason = "pivoted: the guest now uses the destination"
    elif any(pivoted):
        outcome, authority = Outcome.FAILED, Authority.MIXED
        names = ", ".join(d.name for d, p in zip(op.disks, pivoted, strict=True) if p)
        error = f"partial pivot: only {names} pivoted; " + ("; ".join(errors) or "see each disk")
    elif op.error or errors or (on_success is Outcome.PIVOTED):
        outcome, authority = Outcome.FAILED, Authority.SOURCE
        error = op.error or "; ".join(errors) or "no disk pivoted"
        reason = "the guest stays on the source"
    else:
        outcome, authority, error = on_success, Authority.SOURCE, None
    record = _replace(record, phase=Phase.SETTLING, outcome=outcome, authoritative=authority,
                      error=error, reason=reason)
    if record.paused_by_us and not record.resumed and obs.run_state == "paused":
        # The outcome is written first (the step's record); only then is the guest resumed. (Not
        # paused any more: SETTLING says what became of it, and resumes one reset meanwhile.)
        resume = qmp("cont", after=_replace(record, resumed=True))
        return Step(record=record, commands=(resume,), note=f"outcome {outcome}")
    return Step(record=record, note=f"outcome {outcome}")


# --- phases --------------------------------------------------------------------------------------


def _starting(op: Operation, obs: Observation) -> Step:
    if obs.failure is not None:
        return _abort(op, f"could not start: {obs.failure.message}")
    for index, disk in enumerate(op.disks):
        state = obs.dest_state[index] if index < len(obs.dest_state) else "absent"
        if disk.stage is Stage.CREATE:
            if state == "ours":
                # Made and linked into place before a crash: the journaled identity proves it.
                return Step(record=op.with_disk(index, stage=Stage.ADD, dest_created=True),
                            note=f"{disk.dest_path} was created by this job")
            if state == "foreign":
                return _abort(op, f"disk {disk.name}: {disk.dest_path} exists and is not the file this job "
                                  "created (someone else made or replaced it); it was left untouched. Move it "
                                  "away or choose another destination, then copy again")
            after = op.with_disk(index, stage=Stage.ADD, dest_created=True)
            return Step(commands=(Command("create-image", disk=index, after=after),),
                        note=f"create {disk.dest_path}")
        if disk.stage is Stage.ADD:
            if disk.dest_node in obs.nodes:
                return Step(record=op.with_disk(index, stage=Stage.MIRROR), note="destination node already added")
            if state != "ours":
                what = "is gone" if state == "absent" else "now names another file (replaced, or a symlink)"
                return _abort(op, f"disk {disk.name}: {disk.dest_path} {what} since blockcopy "
                                  f"{'created' if disk.dest_created else 'checked'} it; refusing to open it")
            # Both re-observable (the node, the job), so one step: a crash in between resumes at
            # "node already added". The mirror starts one journal commit and round trip sooner.
            started = op.with_disk(index, stage=Stage.STARTED)
            add = Command("add-dest", "blockdev-add", _blockdev_add_args(op, disk), disk=index)
            return Step(commands=(add,
                                  qmp("blockdev-mirror", _mirror_args(op, disk), disk=index, after=started)),
                        note=f"add node {disk.dest_node} and start mirror {disk.job_id}")
        if disk.stage is Stage.MIRROR:
            after = op.with_disk(index, stage=Stage.STARTED)
            if disk.job_id in obs.jobs:
                return Step(record=after, note="mirror already started")
            return Step(commands=(qmp("blockdev-mirror", _mirror_args(op, disk), disk=index, after=after),),
                        note=f"start mirror {disk.job_id}")
    return Step(record=_replace(op, phase=Phase.COPYING), note="all mirrors started")


def _blockdev_add_args(op: Operation, disk: DiskRecord) -> dict[str, Any]:
    if disk.dest_args is not None:
        # Asked for (``page_cache_fill``), the copy goes through the host's page cache where DEST will
        # be O_DIRECT: sequential buffered writes that the kernel writes out while the copy runs (see
        # writeback.py), faster than O_DIRECT writes of the mirror's chunks on some storage. Once
        # every job is ready, DEST is reopened with the source's cache mode (COPYING). aio=native
        # needs O_DIRECT from the start and cannot be changed by a reopen: such DESTs are O_DIRECT
        # throughout.
        return _through_page_cache(disk.dest_args) if _copy_through_page_cache(op, disk) else dict(disk.dest_args)
    args: dict[str, Any] = {
        "driver": disk.dest_format,
        "node-name": disk.dest_node,
        "file": {"driver": "file", "filename": disk.dest_path},
    }
    if disk.dest_format == "qcow2" and not op.shallow:
        args["backing"] = None  # a full copy stands alone; never open a backing file named in DEST
    # A shallow DEST opens the backing file its header names: blockcopy wrote it there (created
    # DEST), or checked before starting that it is the source's backing image (reused DEST).
    # `"backing": null` there would make the guest read zeros wherever its data lives in the base.
    return args


def _levels(args: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The nodes of a nested blockdev-add, top first."""
    out = []
    node: Any = args
    while isinstance(node, Mapping):
        out.append(node)
        node = node.get("file")
    return out


def _copy_through_page_cache(op: Operation, disk: DiskRecord) -> bool:
    """Whether DEST is added with cache.direct=off although its journaled options say on.

    Only where asked for (``op.page_cache_fill``; the default is O_DIRECT from the start, as the
    source: on libvirt's rig of 2026-11-27 evening that copied as fast and the guest's largest gap
    before `ready` was a quarter as long; README, Benchmarks), the page cache is written out while the copy runs
    and nothing else stands in the way: a regular file (the writeback follows files; a block device
    is O_DIRECT throughout), a goal whose command waits for the copy (a bare `copy` leaves no process to write back, and
    QEMU's flush before `ready` would then write it all while guest writes wait), no aio=native
    (needs O_DIRECT from the start), no shallow copy (its reopen, which names the backing node, is
    not tested)."""
    return _may_fill_through_page_cache(op, disk) and fills_for_goal(op.goal)


def _may_fill_through_page_cache(op: Operation, disk: DiskRecord) -> bool:
    """:func:`_copy_through_page_cache` but for the goal, which may change after DEST was added (an
    interrupted wait keeps the copy, `pivot` later asks for the pivot)."""
    return op.page_cache_fill and _disk_refuses_fill(op, disk) is None


def _disk_refuses_fill(op: Operation, disk: DiskRecord) -> str | None:
    """Why ``disk``'s DEST cannot be filled through the page cache whatever the goal, or None: the
    one list of those conditions, read by the protocol and said to the user alike."""
    if not _wants_direct(disk):
        return ("its DEST is not to be O_DIRECT (its options, the source's or --dest-option's, use the page cache), "
                "so it is filled through the page cache anyway")
    levels = _levels(disk.dest_args or {})
    if op.shallow:
        return "not with a shallow copy"
    if levels[-1].get("driver") != "file":
        return f"its DEST is not a file ({levels[-1].get('driver')}): it is O_DIRECT throughout"
    if any(n.get("aio") == "native" for n in levels):
        return "its DEST uses aio=native, which needs O_DIRECT from the start"
    return None


def page_cache_fill_unused(op: Operation, disk: DiskRecord) -> str | None:
    """Why a page-cache fill asked for (``op.page_cache_fill``) does nothing for ``disk``, or None
    where it applies: the conditions of :func:`_copy_through_page_cache`, said to the user at the
    start (a warning of the job) instead of a silent no-op. The goal's reason is given only for a
    DEST that is to be O_DIRECT (it says so)."""
    if not op.page_cache_fill:
        return None
    if _wants_direct(disk) and not fills_for_goal(op.goal):
        return ("only a job that is to pivot or finish from its start (`copy --pivot` or `--finish`, the API's goal "
                "pivot or finish) is filled through the page cache, which its command writes out while it waits; "
                "this one's DEST is O_DIRECT from the start, and stays so if it is pivoted later")
    return _disk_refuses_fill(op, disk)


def fills_for_goal(goal: Goal) -> bool:
    """Whether a job with this goal from its start may fill its DEST through the page cache: one
    whose command waits for the copy, and so writes the page cache out meanwhile (a bare `copy`
    leaves no process behind, and QEMU's flush before `ready` would write it all while guest
    writes wait). The plan clears ``page_cache_fill`` of any other job, so that a goal changed
    before DEST is added does not fill it after the job said it would not."""
    return goal in (Goal.PIVOT, Goal.FINISH)


def in_page_cache_while_copying(op: Operation, disk: DiskRecord) -> bool:
    """Whether DEST's file may be written through the host's page cache while the mirror fills it:
    the files the driver writes out while copying (see writeback.py). Its file node journaled
    O_DIRECT (as inherited from the nodes above, as QEMU does) and no page-cache fill asked for:
    nothing to write out, and syncing would only add device flushes under the guest's writes. With
    a fill asked for, whatever the goal now: the goal that decided how DEST was added may have
    changed since (syncing an O_DIRECT file costs little; not syncing a buffered one, a long stall
    before `ready`)."""
    return not _file_node_direct(disk) or _may_fill_through_page_cache(op, disk)


def _file_node_direct(disk: DiskRecord) -> bool:
    """DEST's bottom node is journaled cache.direct=on, set on it or inherited from a node above."""
    direct = False
    for level in _levels(disk.dest_args or {}):
        value = (level.get("cache") or {}).get("direct")
        if value is not None:
            direct = bool(value)
    return direct


def _wants_direct(disk: DiskRecord) -> bool:
    """Some node of DEST is journaled cache.direct=on (so it may have been added through the page cache)."""
    return any((n.get("cache") or {}).get("direct") for n in _levels(disk.dest_args or {}))


def _through_page_cache(args: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(args)
    if "cache" in out:
        out["cache"] = {**dict(out["cache"]), "direct": False}
    if isinstance(out.get("file"), Mapping):
        out["file"] = _through_page_cache(out["file"])
    return out


def _needs_direct(disk: DiskRecord, obs: Observation) -> bool:
    """Some node of DEST is open with another cache mode than journaled (it was added through the
    page cache). Compared node by node, as QEMU reports them, so a reopen is idempotent and ends."""
    for level in _levels(disk.dest_args or {}):
        want = (level.get("cache") or {}).get("direct")  # unset: inherited from the parent, as QEMU does
        seen = obs.node_cache.get(str(level.get("node-name")))
        if want is not None and seen is not None and seen[0] != bool(want):
            return True
    return False


def _reopened_options(disk: DiskRecord, obs: Observation) -> list[dict[str, Any]]:
    """blockdev-reopen options for DEST's nodes with the journaled (source's) options: every node,
    top first, its child named rather than defined, the bottom one on the file QEMU opened (the fd set)."""
    levels = _levels(disk.dest_args or {})
    options = []
    for level, below in zip(levels, [*levels[1:], None], strict=True):
        node = {k: v for k, v in level.items() if k != "file"}
        if below is not None:
            node["file"] = below["node-name"]
        elif "filename" in node:
            node["filename"] = obs.node_cache.get(str(node["node-name"]), (True, str(node["filename"])))[1]
        options.append(node)
    return options


def _mirror_args(op: Operation, disk: DiskRecord) -> dict[str, Any]:
    args: dict[str, Any] = {
        "job-id": disk.job_id,
        "device": disk.source_node,
        "target": disk.dest_node,
        "sync": "top" if op.shallow else "full",
        "copy-mode": op.mode,
        "auto-finalize": False,
        "auto-dismiss": False,
    }
    if disk.replaces:
        args["replaces"] = disk.replaces  # the filters above the image stay; only the image is swapped
    if op.bandwidth:
        args["speed"] = op.bandwidth
    if op.buf_size:
        args["buf-size"] = op.buf_size
    return args


def _copying(op: Operation, obs: Observation) -> Step:
    original = op
    if op.goal is Goal.ABORT:
        return Step(record=_replace(op, phase=Phase.ABORTING), note="abort requested")
    trouble = _job_trouble(op, obs)
    if trouble:
        return _abort(op, trouble)
    if any(obs.jobs[d.job_id].status in ("waiting", "pending") for d in op.disks):
        # Completed outside a pivot (a job-complete that landed after the pivot went back to
        # copying, or another client's): a pending mirror holds the guest's writes; no pivot now.
        return _abort(op, "a mirror job was completed outside blockcopy's pivot; the copy is cancelled, no disk "
                          "pivoted")
    # A pivot that a memory dump or a migration holds says so (``waiting``, journaled for `status`)
    # while it lasts and the goal is still a pivot; any other record of the copy says nothing holds it.
    held = op.goal is Goal.PIVOT and (obs.run_state == SAVING_VM or _migrating(obs))
    if op.waiting and not held:
        op = _replace(op, waiting="")
    if not op.speed_applied:
        return _set_speed(op, obs)
    if all(obs.jobs[d.job_id].status == "ready" for d in op.disks):
        if op.goal is Goal.PIVOT and obs.run_state == SAVING_VM:
            # A memory dump (dump-guest-memory, detached) pauses the guest itself and resumes it when
            # it ends, at any moment: a pivot begun now would take that pause for its user's and go
            # on without its own, and the dump's end could resume the guest between job-finalize
            # and the outcome's record. Wait for the dump to end, and say so (journaled once: `status`).
            if op.waiting != DUMP_WAIT:
                return Step(record=_replace(op, waiting=DUMP_WAIT), wait=Wait.COPY, note=DUMP_WAIT)
            return Step(wait=Wait.COPY, note=DUMP_WAIT)
        if op.goal is Goal.PIVOT and _migrating(obs):
            # A migration takes the guest to another QEMU that opens the disks its own command line
            # names: a pivot now would leave the guest's writes after it on a DEST the other side
            # never opens, and one after the VM has migrated away would journal DEST while the
            # guest writes the source elsewhere. Wait until the guest can run here again (the
            # migration failed or was cancelled; or it was resumed here, as libvirt does when the
            # destination fails to take over), or this QEMU exits (not pivoted: the source, which
            # the other side opened), and say so (journaled once: `status`). Checked before the
            # reopen of a page-cache-filled DEST: a migrated VM's nodes are inactive.
            why = _migration_wait(obs)
            if op.waiting != why:
                return Step(record=_replace(op, waiting=why), wait=Wait.COPY, note=why)
            return Step(wait=Wait.COPY, note=why)
        if op.goal is Goal.PIVOT:
            # A DEST filled through the page cache (--page-cache-fill) gets the source's cache mode.
            # (A finish closes and fsyncs DEST; a copy kept ready is reopened when it is pivoted.)
            reopens = tuple(qmp("blockdev-reopen", {"options": _reopened_options(d, obs)}, disk=i)
                            for i, d in enumerate(op.disks) if _needs_direct(d, obs))
            failure = obs.failure
            if reopens and failure is not None and failure.command.name == "blockdev-reopen":
                return _abort(op, f"could not give the destination its O_DIRECT cache mode: {failure.message}")
            if reopens and obs.stalled:
                return _abort(op, "could not give the destination its O_DIRECT cache mode: QEMU still reports "
                                  "another cache mode after the reopen")
            if reopens:
                return Step(record=op if op.waiting != original.waiting else None, commands=reopens,
                            wait=Wait.SETTLE, note="reopen the destinations with cache.direct=on")
        if op.goal is Goal.PIVOT:
            running = obs.run_state == "running"
            record = _replace(op, phase=Phase.PIVOTING, vm_was_running=running, paused_by_us=running)
            return Step(record=record, note="pivot: every job is ready")
        if op.goal is Goal.FINISH:
            return Step(record=_replace(op, phase=Phase.FINISHING), note="finish: every job is ready")
    if op.waiting != original.waiting:  # (the dump or migration ended, or the goal changed: nothing holds it now)
        return Step(record=op, wait=Wait.COPY, note=f"no longer waiting: {original.waiting}")
    return Step(wait=Wait.COPY, note="copying")


#: QEMU's run state while a detached memory dump holds the guest paused; QEMU resumes it itself
SAVING_VM = "save-vm"
#: what a pivot held by such a dump says (the journaled ``Operation.waiting``)
DUMP_WAIT = ("the pivot waits for QEMU's memory dump (dump-guest-memory) to end: the dump holds the guest paused "
             "and resumes it itself")
#: what a pivot held by a running migration says (see _migration_wait for the others)
MIGRATION_WAIT = ("the pivot waits for the VM's migration to end (query-migrate): the QEMU a VM migrates to opens the "
                  "disks its own command line names, not DEST. Cancel the migration (QMP migrate_cancel, virsh "
                  "domjobabort) or abort the copy (blockcopy abort JOB)")
#: ... by a VM that a completed migration (or a save to a file) left stopped here
MIGRATED_WAIT = ("the pivot waits for the guest to run here again: the VM was migrated away or saved to a file "
                 "(run state postmigrate, migration completed), and whatever runs it next opens the disks its own "
                 "configuration names. Resume it here (QMP cont, virsh resume) to pivot, or abort the copy (blockcopy "
                 "abort JOB); the job ends not pivoted if this QEMU exits")
#: ... by a VM that a migration that did not finish left stopped here
MIGRATION_FAILED_WAIT = ("the pivot waits for the guest to run here again: a migration that did not finish left it "
                         "stopped (run state postmigrate). Resume it (QMP cont, virsh resume) to pivot, or abort "
                         "the copy (blockcopy abort JOB)")
#: the driver's refusal of a pivot's ``stop`` when a migration began since the copy's last look
#: (nothing was sent): PIVOTING goes back to COPYING, which waits the migration out
MIGRATION_BEGAN = "a migration of the VM began: no pause, no pivot while it runs"
#: query-migrate statuses of no migration running
MIGRATION_ENDED = frozenset({"", "none", "completed", "failed", "cancelled"})
#: run states of a VM that a migration is switching over or took away: its guest does not run
#: here, and QEMU sets them after the status (COMPLETED comes first, POSTMIGRATE after it)
MIGRATED_STATES = frozenset({"finish-migrate", "postmigrate"})
#: journaled (a warning) when a migration runs once the pivot is done
MIGRATION_AFTER_PIVOT = ("a migration of the VM runs: the QEMU it migrates to opens the disks its own command line "
                         "names, not DEST, and would lose the guest's writes since the pivot; cancel it (QMP "
                         "migrate_cancel, virsh domjobabort) unless that QEMU is configured with DEST")
#: ... when one has already taken the VM away once the pivot is done
MIGRATED_AFTER_PIVOT = ("the VM was migrated away (or saved) after the pivot: whatever runs it next opens the disks "
                        "its own configuration names; unless that is DEST, it lacks the guest's writes since the "
                        "pivot: point it at DEST before the guest runs there")
#: journaled (a warning) when a guest that blockcopy paused is in another state than paused by then
def resumable(obs: Observation) -> bool:
    """Whether a guest that blockcopy paused may be resumed with `cont`: paused, or in `prelaunch`,
    where QEMU 7.2 puts a guest reset while it was stopped (a `system_reset`, or the guest's own
    reboot request, handled during the pause), unless a migration completed (QEMU also lets a
    migrated-away VM go from postmigrate to prelaunch, and `cont` would run it here as well as on
    the other side; nor while one runs). Any other state (a migration's) is not blockcopy's to
    leave."""
    return obs.run_state == "paused" or (obs.run_state == "prelaunch" and obs.migration in ("none", "failed",
                                                                                            "cancelled"))

TAKEN_OVER = ("blockcopy paused the guest for the pivot, and QEMU's run state is now {state}, not paused (a "
              "migration or something else took it over): blockcopy does not resume it; resume it where it runs "
              "now (QMP cont, virsh resume) once its state allows")


def _migration_wait(obs: Observation) -> str:
    """What a pivot held by a migration says, from query-migrate and the run state together."""
    if obs.run_state == "postmigrate" and obs.migration == "completed":
        return MIGRATED_WAIT
    if obs.run_state == "postmigrate":
        return MIGRATION_FAILED_WAIT
    return MIGRATION_WAIT


def _migrating(obs: Observation) -> bool:
    """A migration runs, or has stopped the guest here for good (switched over, or ended with the
    guest elsewhere): read from query-migrate and the run state together."""
    return obs.migration not in MIGRATION_ENDED or obs.run_state in MIGRATED_STATES


def _set_speed(op: Operation, obs: Observation) -> Step:
    """A journaled speed change (``bandwidth``, 0 = unlimited) that QEMU has not acknowledged: sent
    to every job, the acknowledgement journaled after the last one. Sending it again is harmless, so
    a crash in between only sends it again. A refusal is journaled as a warning, not retried."""
    failure = obs.failure
    if failure is not None and failure.command.name == "block-job-set-speed":
        warning = f"could not change the speed to {op.bandwidth} bytes/s: {failure.message}"
        return Step(record=_replace(op, speed_applied=True, warnings=(*op.warnings, warning)), note=warning)
    done = _replace(op, speed_applied=True)
    commands = tuple(qmp("block-job-set-speed", {"device": d.job_id, "speed": op.bandwidth}, disk=i,
                         after=done if i == len(op.disks) - 1 else None)
                     for i, d in enumerate(op.disks))
    return Step(commands=commands, note=f"set the speed to {op.bandwidth} bytes/s")


def _pivoting(op: Operation, obs: Observation) -> Step:
    if any(_uses_dest(obs, d) for d in op.disks):
        # A device switched although the journal does not say FINALIZING: another client's
        # job-finalize. The pivot can only go forward now; journal that first.
        return Step(record=_replace(op, phase=Phase.FINALIZING), note="a device switched: go forward")
    began = (obs.failure is not None and obs.failure.command.name == "stop"
             and MIGRATION_BEGAN in obs.failure.message)
    if began or obs.run_state in MIGRATED_STATES:
        # A migration began since the copy's last look (the driver's look right before `stop`
        # saw it, and sent nothing), or stopped the guest for its switch-over: with nothing of the
        # pivot sent, back to copying, which waits it out (_migration_wait); once blockcopy's stop
        # and completes went out, the pivot is given up. Not resumed by blockcopy either way (a
        # `cont` here would run the guest on both sides); a guest it paused gets a warning.
        all_ready = all((j := _job(op, obs, d)) is not None and j.status == "ready" for d in op.disks)
        # Its stop went out, the job-completes behind it: the stop's time says so, and so do jobs
        # that left `ready` (completes go only behind blockcopy's stop, or to a guest seen paused;
        # the time is not journaled before the next record, and a crash may have lost it).
        # (A refusal by the look before `stop` means the guest ran then: nothing of blockcopy's paused it.)
        sent = op.paused_by_us and not began and (op.stop_ts is not None or not all_ready)
        if not sent and all_ready:
            return Step(record=_replace(op, phase=Phase.COPYING, paused_by_us=False, vm_was_running=None),
                        note="a migration began: back to copying until it ends")
        trouble = _job_trouble(op, obs)
        error = "pivot abandoned, no disk pivoted: a migration of the VM began during the pivot" + (
            f" ({trouble})" if trouble else "")
        left = (TAKEN_OVER.format(state=obs.run_state) if obs.run_state in MIGRATED_STATES else
                "blockcopy paused the guest for the pivot, and a migration of the VM began: blockcopy does not "
                "resume it; resume it where it runs once the migration has ended (QMP cont, virsh resume)")
        warnings = (*op.warnings, left) if sent else op.warnings
        return _abort(_replace(op, paused_by_us=False, warnings=warnings), error)
    trouble = _job_trouble(op, obs)
    if trouble:
        return _abort(op, f"pivot failed, no disk pivoted: {trouble}")
    failure = obs.failure
    if failure is not None and failure.command.name == "job-complete" and failure.command.disk is not None:
        disk = op.disks[failure.command.disk]
        if obs.jobs[disk.job_id].status == "ready":  # not a late duplicate: QEMU refused the pivot
            return _abort(op, f"pivot refused for disk {disk.name}: {failure.message}")
    statuses = [obs.jobs[d.job_id].status for d in op.disks]
    running = obs.run_state == "running"
    if obs.run_state == SAVING_VM:
        # A memory dump began after the copy's last look: it holds the guest paused and resumes it
        # when it ends, at any moment, so blockcopy's pause would not hold. With no job completed
        # yet, back to copying until the dump ends (a job-complete still on its way lands there and
        # cancels the copy); with one completed, the pivot is given up (pending jobs can be cancelled).
        if all(s == "ready" for s in statuses):
            return Step(record=_replace(op, phase=Phase.COPYING, paused_by_us=False, vm_was_running=None),
                        note="a memory dump paused the guest: back to copying until it ends")
        return _abort(op, "pivot abandoned, no disk pivoted: a memory dump paused the guest during the pivot (QEMU "
                          "resumes it when the dump ends)")
    if running and not op.paused_by_us and any(s in ("waiting", "pending") for s in statuses):
        # A guest its user had paused was resumed after some jobs were completed: their disks'
        # writes wait while the jobs are pending, and the pivot could only be given up once all
        # are (finalizing would let it write to DEST before the outcome is journaled). At once.
        return _abort(op, "pivot abandoned, no disk pivoted: the guest was resumed by someone else during the pivot")
    if all(s == "pending" for s in statuses):  # checked before `stalled`: all pending wins
        if running and failure is not None and failure.command.name == "stop":
            # QEMU refused the pause with the job-completes already behind it (QEMU 7.2 refuses
            # `stop` only during a memory dump, which pauses the guest itself: a dump that had
            # started and ended around blockcopy's look): finalizing now would pivot a running guest.
            return _abort(op, f"pivot abandoned, no disk pivoted: QEMU refused to pause the guest ({failure.message})")
        if running:
            # Someone resumed the guest after the jobs were completed. Finalizing now would let it
            # write to DEST before the outcome is journaled; should QEMU then die, the journal could
            # not name the image holding those writes.
            return _abort(op, "pivot abandoned, no disk pivoted: the guest was resumed by someone else "
                              "during the pivot")
        # The point of no return is the first job-finalize, journaled before it (one fsync inside
        # the pause): should QEMU die with the journal saying FINALIZING, a device may have
        # switched, and only then may the guest have written to DEST.
        return Step(record=_replace(op, phase=Phase.FINALIZING), commands=_finalizes(op, obs), observe_at_once=True,
                    note="every job is pending: finalize")
    if obs.stalled:
        return _abort(op, "pivot failed, no disk pivoted: the jobs did not all reach 'pending' in time")
    ready = [(i, d) for i, d in enumerate(op.disks) if obs.jobs[d.job_id].status == "ready"]
    if running and not op.paused_by_us and len(ready) == len(op.disks):
        # Resumed (by its user) between the pivot's record and now: blockcopy pauses it, as it
        # pauses every running guest for the pivot; journaled before the `stop`.
        return Step(record=_replace(op, paused_by_us=True, vm_was_running=True),
                    note="the guest runs now: pause it for the pivot")
    # Once per job (and Manager): QEMU 7.2's mirror takes a second job-complete while the job is
    # still `ready` (it copies what is left dirty before it leaves `ready`), and for a mirror that
    # `replaces` a node below filters (throttle) it then sets its replace blocker a second time,
    # which QEMU's error API asserts against (read in mirror.c: QEMU would abort, with the guest).
    completes = tuple(qmp("job-complete", {"id": d.job_id}, disk=i, once=True) for i, d in ready)
    if op.paused_by_us and running:
        # `stop` flushes every image; writing the dirty page cache out first keeps that flush (and
        # so the guest's pause) short however much the guest wrote just before. `stop` returns
        # with the guest paused, so the jobs are completed in the same step.
        return Step(commands=(Command("sync-images"), qmp("stop"), *completes), wait=Wait.SETTLE,
                    observe_at_once=True, note="pause the guest and complete the jobs")
    return Step(commands=completes, wait=Wait.SETTLE, observe_at_once=True, note="complete the jobs")


def _finalizes(op: Operation, obs: Observation) -> tuple[Command, ...]:
    return tuple(qmp("job-finalize", {"id": d.job_id}, disk=i)
                 for i, d in enumerate(op.disks)
                 if (j := _job(op, obs, d)) is not None and j.status == "pending")


def _finalizing(op: Operation, obs: Observation) -> Step:
    finalizes = _finalizes(op, obs)
    concluding = finalizes or any((j := _job(op, obs, d)) is not None and j.status in LIVE_STATUSES | {"aborting"}
                                  for d in op.disks)
    refused = obs.failure is not None and obs.failure.command.name == "job-finalize"
    if obs.stalled and concluding:
        # Past the point of no return there is no going back: a finalize QEMU keeps refusing or
        # ignoring, or a job that does not conclude, ends the command once the time is up (the
        # guest stays paused, and the driver says so); `recover` goes on. (The clock restarts with
        # each record and each new command, so a recovery always tries first.)
        return Step(stuck=f"QEMU did not conclude the pivot of job {op.id} in time")
    if finalizes and refused:
        return Step(commands=finalizes, wait=Wait.SETTLE, note="finalize again after a refusal")
    if finalizes:
        return Step(commands=finalizes, observe_at_once=True, note="finalize the jobs")
    if concluding:
        return Step(wait=Wait.SETTLE, note="waiting for the jobs to conclude")
    return _conclude(op, obs, on_success=Outcome.PIVOTED, reason="pivoted")


def _finishing(op: Operation, obs: Observation) -> Step:
    if not op.forced:
        for disk in op.disks:
            job = _job(op, obs, disk)
            if disk.mirror_ended:
                continue  # its mirror was seen ending cleanly (journaled); the job may be dismissed now
            if job is None or job.error:
                why = job.error if job is not None else "the job disappeared from QEMU"
                return _abort(op, f"finish failed for disk {disk.name}: {why}")
    live = [(i, d) for i, d in enumerate(op.disks)
            if (j := _job(op, obs, d)) is not None and j.status in LIVE_STATUSES | {"aborting"}]
    if live and obs.stalled:
        if not op.forced:
            # The mirror did not converge in time (e.g. a busy guest on slow storage). Cancel it for
            # good: the guest stays on the source, and DEST is *not* claimed to be a consistent copy.
            return Step(record=_replace(op, forced=True),
                        note="finish did not complete in time: cancel the mirror (DEST not consistent)")
        return Step(stuck=f"QEMU did not end the mirror jobs of job {op.id} in time, even when cancelled; "
                          "they stay in QEMU. Run `blockcopy recover` later to finish them")
    commands: list[Command] = []
    for i, d in live:
        job = obs.jobs[d.job_id]
        if op.forced:
            if job.status != "aborting" and obs.failure is None:
                commands.append(qmp("job-cancel", {"id": d.job_id}, disk=i))
        elif job.status == "ready":
            # Soft cancel of a ready mirror: it ends without pivoting and leaves DEST consistent. The
            # job stays `ready` while it converges; sent again then, as it leaves `ready`, QEMU would
            # take it for a hard cancel ("Operation canceled").
            commands.append(qmp("block-job-cancel", {"device": d.job_id}, disk=i, once=True))
        elif job.status == "pending":
            commands.append(qmp("job-finalize", {"id": d.job_id}, disk=i))
    if commands:
        return Step(commands=tuple(commands), wait=Wait.SETTLE, note="finish the jobs")
    if live:
        return Step(wait=Wait.SETTLE, note="waiting for the jobs to conclude")
    if op.forced:
        cancelled = _replace(op, disks=tuple(dataclasses.replace(d, consistent=False) for d in op.disks))
        return _conclude(cancelled, obs, on_success=Outcome.NOT_PIVOTED, job_errors_fail=False,
                         reason="finished by cancelling: the mirror did not converge in time, so the destination "
                                "is NOT a consistent copy; the guest stays on the source")
    return _close_destinations(op, obs)


def _close_destinations(op: Operation, obs: Observation) -> Step:
    """Every mirror ended cleanly. DEST is a consistent copy only once it is on stable storage:
    qcow2 metadata may live in QEMU's cache until QEMU closes the node, and QEMU ignores a failed
    flush on close. So: journal what was seen, dismiss the jobs and delete the DEST nodes, fsync each
    DEST file, and claim consistency only where all of that succeeded."""
    if not all(d.mirror_ended for d in op.disks):
        record = _replace(op, disks=tuple(dataclasses.replace(d, mirror_ended=True) for d in op.disks))
        return Step(record=record, note="every mirror ended cleanly: close the destinations")
    failure = obs.failure
    closing_failed = failure is not None and (failure.command.name == "blockdev-del"
                                              or failure.command.kind == "sync-dest")
    if failure is not None and closing_failed and failure.command.disk is not None:
        index = failure.command.disk
        what = "close" if failure.command.name == "blockdev-del" else "write out"
        warning = (f"disk {op.disks[index].name}: could not {what} the destination ({failure.message}); it is "
                   "not claimed to be a consistent copy")
        return Step(record=_replace(op.with_disk(index, consistent=False), warnings=(*op.warnings, warning)),
                    note="destination not closed")
    closing: list[Command] = []
    for i, d in enumerate(op.disks):
        if d.consistent is not None:
            continue
        if _job(op, obs, d) is not None:
            closing.append(qmp("job-dismiss", {"id": d.job_id}, disk=i))
        if d.dest_node in obs.nodes:
            closing.append(qmp("blockdev-del", {"node-name": d.dest_node}, disk=i))
    if closing:
        return Step(commands=tuple(closing), wait=Wait.SETTLE, note="close the destinations (QEMU flushes them)")
    for i, d in enumerate(op.disks):
        if d.consistent is None:  # one per step: each after-record builds on the journaled one
            return Step(commands=(Command("sync-dest", disk=i, after=op.with_disk(i, consistent=True)),),
                        note=f"write {d.dest_path} out to stable storage")
    record = _replace(op, disks=tuple(dataclasses.replace(d, cleaned=True) for d in op.disks))
    reason = "finished: the destination is a consistent copy; the guest stays on the source"
    if not all(d.consistent for d in op.disks):
        reason = "finished; see the warnings for the destinations that are not a consistent copy"
    return _conclude(record, obs, on_success=Outcome.NOT_PIVOTED, reason=reason)


def _aborting(op: Operation, obs: Observation) -> Step:
    cancels = tuple(qmp("job-cancel", {"id": d.job_id}, disk=i)
                    for i, d in enumerate(op.disks)
                    if (j := _job(op, obs, d)) is not None and j.status in LIVE_STATUSES)
    refused = obs.failure is not None and obs.failure.command.name == "job-cancel"
    if cancels and not refused and not obs.stalled:
        return Step(commands=cancels, wait=Wait.SETTLE, note="cancel the jobs")
    if not obs.stalled and any((j := _job(op, obs, d)) is not None
                               and j.status in LIVE_STATUSES | {"aborting"} for d in op.disks):
        return Step(wait=Wait.SETTLE, note="waiting for the jobs to conclude")
    # Concluded, or cancelled and slow to end: either way no device can switch any more (blockcopy
    # never finalizes a job from here), so the outcome is known and a guest paused by blockcopy
    # can be resumed; SETTLING waits for QEMU to end the jobs before the operation is done.
    reason = "aborted: the guest stays on the source" if op.error is None else "the guest stays on the source"
    return _conclude(op, obs, on_success=Outcome.NOT_PIVOTED, reason=reason, job_errors_fail=False)


def _settling(op: Operation, obs: Observation) -> Step:
    failure = obs.failure
    if op.paused_by_us and not op.resumed:
        after = _replace(op, resumed=True)
        if failure is not None and failure.command.name == "cont":
            warning = f"could not resume the guest: {failure.message}; resume it with QMP 'cont'"
            return Step(record=_replace(after, warnings=(*op.warnings, warning)), note="resume refused")
        if resumable(obs):
            return Step(commands=(qmp("cont", after=after),), note="resume the guest")
        if obs.run_state == "running":
            return Step(record=after, note="guest already running")
        warning = TAKEN_OVER.format(state=obs.run_state)
        return Step(record=_replace(after, warnings=(*op.warnings, warning)), note=warning)
    if (op.outcome is Outcome.PIVOTED and _migrating(obs)
            and not {MIGRATION_AFTER_PIVOT, MIGRATED_AFTER_PIVOT} & set(op.warnings)):
        # One that began inside the pivot (after the copy's last look, or the look right before
        # `stop`): too late to hold the pivot; a running one can still be stopped, a completed one
        # left a destination to point at DEST.
        warning = MIGRATED_AFTER_PIVOT if obs.migration == "completed" else MIGRATION_AFTER_PIVOT
        return Step(record=_replace(op, warnings=(*op.warnings, warning)), note=warning)
    if failure is not None and failure.command.purpose == "cleanup" and failure.command.disk is not None:
        index = failure.command.disk
        record = op.with_disk(index, cleaned=True)
        record = _replace(record, warnings=(*op.warnings, f"cleanup: {failure.message}"))
        return Step(record=record, note="cleanup refused, recorded as a warning")
    live = [(i, d) for i, d in enumerate(op.disks)
            if (j := _job(op, obs, d)) is not None and j.status in LIVE_STATUSES | {"aborting"}]
    if live:
        # The outcome is journaled and no device will switch; the operation is done only once
        # QEMU has ended its jobs (an abort that QEMU is slow to carry out).
        if obs.stalled:
            names = ", ".join(d.job_id for _i, d in live)
            return Step(stuck=f"QEMU did not end the jobs {names} of job {op.id} in time; the outcome stands "
                              f"({op.outcome}). Run `blockcopy recover` later to remove them")
        cancels = tuple(qmp("job-cancel", {"id": d.job_id}, disk=i) for i, d in live
                        if obs.jobs[d.job_id].status != "aborting")
        if cancels and failure is None:
            return Step(commands=cancels, wait=Wait.SETTLE, note="cancel the jobs that still run")
        return Step(wait=Wait.SETTLE, note="waiting for QEMU to end the jobs")
    # Every disk's leftovers go in one step (each job is dismissed before its target node is
    # deleted); the next observation shows what is left, and one record ends the operation.
    cleanup: list[Command] = []
    scheduled: set[str] = set()  # a backing node two disks shared is deleted once
    for index, disk in enumerate(op.disks):
        if disk.cleaned:
            continue
        job = _job(op, obs, disk)
        if job is not None and job.status == "concluded":
            cleanup.append(qmp("job-dismiss", {"id": disk.job_id}, disk=index, purpose="cleanup"))
        # One node per disk and step, top first: deleting a format node also frees a protocol node
        # defined inline with it (as blockcopy defines DEST's), which must not be deleted again.
        for node in [n for n in _leftover_nodes(disk)
                     if n in obs.nodes and obs.device_nodes.get(disk.device_key) != n][:1]:
            if node not in scheduled:
                scheduled.add(node)
                cleanup.append(qmp("blockdev-del", {"node-name": node}, disk=index, purpose="cleanup"))
    if cleanup:
        return Step(commands=tuple(cleanup), note="dismiss the jobs, delete the nodes no device uses")
    # fd sets that no node uses any more (this job's DEST after a failure or a finish, an earlier
    # job's DEST after this pivot away from it, one left by a crash before its blockdev-add) are
    # removed once: QEMU keeps a removed descriptor while the guest is not running, so the set can
    # look unused again. Removing a set that another job will add again is harmless.
    if failure is not None and failure.command.name == "remove-fd":
        record = _replace(op, fdsets_released=True, warnings=(*op.warnings, f"cleanup: {failure.message}"))
        return Step(record=record, note="remove-fd refused, recorded as a warning")
    if obs.unused_fdsets and not op.fdsets_released:
        ids = sorted(obs.unused_fdsets)
        removals = [qmp("remove-fd", {"fdset-id": i}, purpose="cleanup") for i in ids[:-1]]
        removals.append(qmp("remove-fd", {"fdset-id": ids[-1]}, purpose="cleanup",
                            after=_replace(op, fdsets_released=True)))
        return Step(commands=tuple(removals), note="remove the fd sets no node uses")
    return Step(record=_replace(op, phase=Phase.DONE, disks=tuple(dataclasses.replace(d, cleaned=True)
                                                                   for d in op.disks)),
                note="done")


def _leftover_nodes(disk: DiskRecord) -> list[str]:
    """Nodes that no device uses once the outcome is known, in the order they must be deleted."""
    if disk.pivoted:
        # The old source stays open (and its file locked) until deleted: the image node the pivot
        # swapped out (never the filters above it, which the device still uses). Nodes QEMU named
        # itself ('#block...', from -drive) are not the monitor's to delete: QEMU frees them on its own.
        below = disk.source_below or (disk.source_file_node,)
        return [n for n in (disk.replaces or disk.source_node, *below) if n and not n.startswith("#")]
    return [disk.dest_node]


def _qemu_gone(op: Operation, obs: Observation) -> Step:
    if op.outcome is not None:
        note = "QEMU exited after the outcome was journaled"
        warnings = op.warnings
        if op.paused_by_us and not op.resumed:
            warnings = (*warnings, "QEMU exited before blockcopy resumed the guest")
        return Step(record=_replace(op, phase=Phase.DONE, warnings=warnings), note=note)
    paused = op.phase in (Phase.PIVOTING, Phase.FINALIZING)
    if paused and obs.identical is None:
        return Step(commands=(Command("compare-images"),), note="QEMU exited mid-pivot: compare the images")
    both = paused and obs.identical is not None and all(obs.identical)
    where = "during the pivot" if paused else f"while {op.phase.value}"
    if op.phase is Phase.FINALIZING and not both:
        record = _replace(
            op, phase=Phase.DONE, outcome=Outcome.FAILED, authoritative=Authority.UNKNOWN, identical=obs.identical,
            error=op.error or "QEMU exited during the pivot after job-finalize, and the images differ",
            reason="QEMU exited during the pivot, after the disks may have switched, and the source and the "
                   "destination differ: someone resumed the guest during the pivot, so blockcopy cannot tell which "
                   "image holds its latest writes. Compare both before booting the VM",
            disks=tuple(dataclasses.replace(d, pivoted=None) for d in op.disks))
        return Step(record=record, note="QEMU is gone; which image is newer is unknown")
    # QEMU exiting (the guest powered off, or someone killed it) is not an error of the copy: the
    # disks simply did not pivot. An error recorded before (a failed job) still makes it "failed".
    holds = ("the source and the destination hold identical data" if both
             else "the source holds every write the guest saw acknowledged")
    record = _replace(
        op, phase=Phase.DONE, outcome=Outcome.FAILED if op.error else Outcome.NOT_PIVOTED,
        authoritative=Authority.BOTH if both else Authority.SOURCE,
        identical=obs.identical,
        reason=f"QEMU exited {where}; {holds}",
        # A finish's DEST that QEMU had not closed may lack data and metadata that lived in its cache.
        disks=tuple(dataclasses.replace(d, pivoted=False, consistent=False if d.mirror_ended and not d.consistent
                                        else d.consistent) for d in op.disks),
    )
    return Step(record=record, note="QEMU is gone")


_HANDLERS = {
    Phase.STARTING: _starting,
    Phase.COPYING: _copying,
    Phase.PIVOTING: _pivoting,
    Phase.FINALIZING: _finalizing,
    Phase.FINISHING: _finishing,
    Phase.ABORTING: _aborting,
    Phase.SETTLING: _settling,
}
