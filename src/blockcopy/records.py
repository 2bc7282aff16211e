"""The journaled record of one copy operation.

An *operation* moves one or more disks of one domain; its disks pivot together. The record is what
survives a crash: the protocol state machine (:mod:`blockcopy.protocol`) reads it together with what
QEMU reports, and every change to it is written to the journal *before* the step it describes.

Records are immutable values; the state machine returns new ones with :func:`dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from blockcopy.qemuproc import QemuProcess


class Goal(enum.StrEnum):
    """What the user asked the operation to end in. Recovery carries the goal out."""

    COPY = "copy"  # start the mirror and keep it running (ready) until told otherwise
    PIVOT = "pivot"  # switch the guest to the destination
    FINISH = "finish"  # end the mirror, leaving the destination as a consistent copy
    ABORT = "abort"  # cancel, the guest stays on the source


class Phase(enum.StrEnum):
    """Where the operation is in the protocol; see the table in :mod:`blockcopy.protocol`."""

    STARTING = "starting"
    COPYING = "copying"
    PIVOTING = "pivoting"
    FINALIZING = "finalizing"
    FINISHING = "finishing"
    ABORTING = "aborting"
    SETTLING = "settling"
    DONE = "done"


class Stage(enum.StrEnum):
    """Per-disk progress through STARTING; each value is the *intent* of the next step."""

    CREATE = "create"  # create the destination image file
    ADD = "add"  # blockdev-add the destination node
    MIRROR = "mirror"  # start blockdev-mirror
    STARTED = "started"  # the mirror job exists in QEMU


class Outcome(enum.StrEnum):
    PIVOTED = "pivoted"
    NOT_PIVOTED = "not-pivoted"
    FAILED = "failed"


class Authority(enum.StrEnum):
    """Which image holds the guest's latest data."""

    SOURCE = "source"
    DESTINATION = "destination"
    BOTH = "both"  # proven identical
    MIXED = "mixed"  # a partial pivot: see each disk
    #: QEMU exited mid-pivot after someone else resumed the guest: the images differ and nothing
    #: tells which one it wrote to last. Never chosen when the journal can tell.
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class DiskRecord:
    """One disk of an operation: where it comes from, where it goes, and how far it got."""

    name: str  # what the user called it (qdev id, drive id or node name)
    device_key: str  # query-block `qdev`, or `device` when there is no qdev: finds the device again
    source_node: str  # the device's root node when the operation started
    source_file: str
    source_format: str
    source_file_node: str | None  # protocol node under source_node, if the user created it
    virtual_size: int
    dest_path: str
    dest_format: str
    dest_node: str
    job_id: str
    backing_file: str | None = None  # for shallow copies: the destination's backing file
    backing_format: str | None = None
    #: DEST's blockdev-add, carrying the source's node options (see nodes.py); its protocol node's
    #: filename is DEST's path, which the driver replaces with the fd set it passes DEST in. None in
    #: records of older blockcopy versions (plain file + format nodes).
    dest_args: Mapping[str, Any] | None = None
    #: the image node below the device's filters (throttle...), swapped by the pivot while the
    #: filters stay; None when the device's root is the image itself
    replaces: str | None = None
    #: nodes below the source image that the pivot leaves unused, in deletion order (its protocol
    #: filters and protocol node; for a full copy the old backing chain too). Empty in records of
    #: older versions: then source_file_node alone.
    source_below: tuple[str, ...] = ()
    dest_owner: tuple[int, int] | None = None  # a created DEST's uid, gid
    dest_mode: int | None = None  # a created DEST's permission bits
    cluster_size: int | None = None  # a created qcow2 DEST's
    preallocation: str | None = None  # a created DEST's
    stage: Stage = Stage.CREATE
    dest_created: bool = False  # blockcopy created dest_path (it did not exist before)
    # Which file DEST is (st_dev, st_ino): journaled before blockcopy links a file it made into place,
    # or when a reused DEST is validated. DEST is opened for QEMU only while the path still names it.
    dest_dev: int | None = None
    dest_ino: int | None = None
    dest_dir_dev: int | None = None  # the directory DEST is created in, as checked when planned
    dest_dir_ino: int | None = None
    pivoted: bool | None = None  # per-disk outcome, from query-block
    mirror_ended: bool = False  # finish: the mirror was seen to conclude without error (journaled fact)
    #: finish: DEST is a consistent copy (its mirror ended cleanly, QEMU closed it, and an fsync of the
    #: file succeeded), or is not (forced, or not closed); None while unknown
    consistent: bool | None = None
    cleaned: bool = False  # leftover nodes and job removed from QEMU
    progress_current: int = 0
    progress_total: int = 0
    job_status: str | None = None  # last status QEMU reported for the job

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (see :meth:`Operation.to_dict`)."""
        out = dict(self.__dict__)
        out["source_below"] = list(self.source_below)
        if self.dest_owner is not None:
            out["dest_owner"] = list(self.dest_owner)
        if self.dest_args is not None:
            out["dest_args"] = _plain(self.dest_args)
        return out


@dataclass(frozen=True)
class Operation:
    id: str
    domain: str
    goal: Goal
    phase: Phase
    disks: tuple[DiskRecord, ...]
    mode: str = "write-blocking"
    shallow: bool = False
    reuse_external: bool = False
    bandwidth: int = 0  # bytes per second, 0 = unlimited
    buf_size: int = 0  # mirror buffer (bytes of data in flight), 0 = QEMU's default
    #: a DEST journaled O_DIRECT is filled through the host's page cache and reopened O_DIRECT once
    #: ready (``copy --page-cache-fill``); False: O_DIRECT from the start, as the source. Planned
    #: False for a job that is not to pivot or finish from its start (protocol.fills_for_goal)
    page_cache_fill: bool = False
    qemu_pid: int | None = None  # the QEMU process the operation runs in (see qemuproc.py)
    qemu_start: int | None = None  # ... and its start time: pid + start time name one process
    qemu_boot: str | None = None  # ... during this boot
    qemu_pidns: int | None = None  # ... seen from this PID namespace
    forced: bool = False  # a finish that stalled was force-cancelled: DEST is not a consistent copy
    fdsets_released: bool = False  # remove-fd was sent for the fd sets no node used (once: see SETTLING)
    vm_was_running: bool | None = None  # run state when the pivot began
    paused_by_us: bool = False  # blockcopy stops the VM for the pivot and must resume it
    resumed: bool = False
    outcome: Outcome | None = None
    authoritative: Authority | None = None
    error: str | None = None
    reason: str | None = None
    #: why a pivot is held while copying (a memory dump holds the guest paused, or a migration runs
    #: or stopped the guest here: protocol.DUMP_WAIT, _migration_wait's texts); "" when nothing
    #: holds it. Shown by ``status`` for a pivot while COPYING; nothing decides on it.
    waiting: str = ""
    warnings: tuple[str, ...] = ()
    created_at: float = 0.0
    updated_at: float = 0.0
    ended_at: float | None = None
    ready_at: float | None = None
    stop_ts: float | None = None  # QEMU's STOP event time for the pivot pause
    resume_ts: float | None = None  # QEMU's RESUME event time
    identical: tuple[bool, ...] | None = None  # image comparison after QEMU died
    #: the client's idempotency key (API ``Idempotency-Key`` or ``copy --request-id``): a second
    #: request with the same key returns this operation instead of starting another
    client_key: str | None = None
    request_digest: str | None = None  # what was asked under ``client_key`` (sha256 of the request)
    #: False between a journaled speed change (``bandwidth``) and QEMU's acknowledgement of it; the
    #: protocol sends ``block-job-set-speed`` until it is True, so a crash in between loses nothing
    speed_applied: bool = True

    @property
    def finished(self) -> bool:
        return self.phase is Phase.DONE

    @property
    def qemu(self) -> QemuProcess | None:
        if self.qemu_pid is None or self.qemu_start is None:
            return None  # journaled by a blockcopy that did not record it
        return QemuProcess(self.qemu_pid, self.qemu_start, self.qemu_boot or "", self.qemu_pidns or 0)

    @property
    def pause_window_ms(self) -> float | None:
        if self.stop_ts is None or self.resume_ts is None:
            return None
        return round((self.resume_ts - self.stop_ts) * 1000.0, 3)

    def with_goal(self, goal: Goal) -> Operation:
        """This record with another goal (asked for, or withdrawn by an interrupted wait): what held
        a pivot (``waiting``) holds no other goal, and is not left journaled for one."""
        return dataclasses.replace(self, goal=goal, waiting=self.waiting if goal is Goal.PIVOT else "")

    def with_disk(self, index: int, **changes: Any) -> Operation:
        disks = list(self.disks)
        disks[index] = dataclasses.replace(disks[index], **changes)
        return dataclasses.replace(self, disks=tuple(disks))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (tuples as lists). Not ``dataclasses.asdict`` nor a walk over
        ``dataclasses.fields``: the record is written twice while the guest is paused for a pivot,
        and those took 0.2-0.6 ms of a save; the fields' own dict is a copy away."""
        out = dict(self.__dict__)
        out["disks"] = [d.to_dict() for d in self.disks]
        out["warnings"] = list(self.warnings)
        if self.identical is not None:
            out["identical"] = list(self.identical)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Operation:
        values = dict(data)
        values["goal"] = Goal(values["goal"])
        values["phase"] = Phase(values["phase"])
        for key, kind in (("outcome", Outcome), ("authoritative", Authority)):
            if values.get(key) is not None:
                values[key] = kind(values[key])
        values["warnings"] = tuple(values.get("warnings", ()))
        if values.get("identical") is not None:
            values["identical"] = tuple(values["identical"])
        disks = []
        for disk in values["disks"]:
            d = dict(disk)
            d["stage"] = Stage(d["stage"])
            if d.get("dest_owner") is not None:
                d["dest_owner"] = tuple(d["dest_owner"])
            d["source_below"] = tuple(d.get("source_below", ()))
            # Fields a later version added are left out, as for the operation below: what they
            # carry is an optimisation there (e.g. which nodes to delete), never the outcome.
            disk_fields = {f.name for f in dataclasses.fields(DiskRecord)}
            disks.append(DiskRecord(**{k: v for k, v in d.items() if k in disk_fields}))
        values["disks"] = tuple(disks)
        # Journaled before the field existed: such a job was started by a blockcopy that filled every
        # such DEST through the page cache, and goes on as it began.
        values.setdefault("page_cache_fill", True)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _plain(value: Any) -> Any:
    """A mapping of JSON-like values with every mapping a dict and every sequence a list."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


_STATE_BY_PHASE = {
    Phase.STARTING: "created",
    Phase.PIVOTING: "pivoting",
    Phase.FINALIZING: "pivoting",
    Phase.FINISHING: "finishing",
    Phase.ABORTING: "aborting",
    Phase.SETTLING: "settling",
    Phase.DONE: "concluded",
}


def withdrawn_note(back: Goal) -> str:
    """The journal's note when an interrupted wait withdraws its pivot or finish, putting ``back`` back."""
    return ("interrupted while waiting: the job keeps copying" if back is Goal.COPY
            else f"interrupted while waiting: the {back.value} asked before stands")


def job_state(op: Operation) -> str:
    """QEMU-style job state for the whole operation: created, running, ready, pivoting, ... concluded
    (what `jobs` shows and events say)."""
    if op.phase is Phase.COPYING:
        return "ready" if op.disks and all(d.job_status == "ready" for d in op.disks) else "running"
    return _STATE_BY_PHASE[op.phase]


#: CopyRequest fields added after requests were first journaled with their digest: hashed only when
#: not at their default, so that a request retried under its key after an upgrade is the same request.
_DIGESTED_IF_SET = frozenset({"page_cache_fill"})


@dataclasses.dataclass(frozen=True)
class CopyRequest:
    """What ``copy`` is asked to do; validated against QEMU before anything is touched."""

    domain: str
    targets: Sequence[tuple[str, str]]  # (disk, destination path)
    format: str | None = None
    shallow: bool = False
    reuse_external: bool = False
    bandwidth_mib: float | None = None
    mode: str = "write-blocking"
    buf_size: int | None = None  # bytes; None: default_buf_size(bandwidth)
    page_cache_fill: bool = False  # see Operation.page_cache_fill
    goal: Goal = Goal.COPY
    dest_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # nodes.parse_dest_option
    owner: tuple[int, int] | None = None  # a created DEST's uid, gid (default: the source file's)
    mode_bits: int | None = None  # a created DEST's permission bits (default: the source file's)
    cluster_size: int | None = None  # a created qcow2 DEST's (default: the source's)
    preallocation: str | None = None  # a created DEST's: off, metadata, falloc, full
    #: the client's idempotency key: the same request again returns the job it created (and starts
    #: nothing); another request under the same key is refused
    client_key: str | None = None

    def digest(self) -> str:
        """What was asked, as a hash: two requests under one key must be the same request."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "client_key"
                  and not (f.name in _DIGESTED_IF_SET and getattr(self, f.name) == f.default)}
        fields["targets"] = [list(t) for t in self.targets]
        fields["goal"] = self.goal.value
        fields["dest_options"] = dict(self.dest_options)
        text = json.dumps(fields, sort_keys=True, default=str)
        import hashlib  # (here: only a request with an idempotency key needs it, not every command's start)

        return hashlib.sha256(text.encode()).hexdigest()
