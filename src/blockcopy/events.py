"""What happened to a job, as events for management apps, derived from consecutive journal records.

The journal writes a job's events in the same transaction as the record they come from, each with a
sequence number (:meth:`blockcopy.journal.Journal.events_after`). So an event exists exactly when
its record does: a crash cannot lose an outcome event nor repeat one, whoever drove the job (the
daemon, or the CLI without it), and a client that reconnects with the last number it saw gets what
it missed, in order. Pure: no I/O, no clock.

Kinds (``data`` always has ``job`` and ``domain``):

==========  ======================================================================================
created     the job was planned and journaled: ``goal``, ``disks`` (name, destination)
state       the protocol phase changed: ``phase``, ``previous``, ``state`` (as ``jobs`` shows it),
            ``note`` (why)
goal        the goal changed (pivot, finish or abort asked; a wait interrupted): ``goal``
ready       every mirror of the job is ready: ``ready_at``
progress    bytes copied (written with the journal's periodic progress saves): ``current``, ``total``
speed       the speed limit changed: ``bandwidth`` (bytes/s, 0 = unlimited), ``applied``
waiting     a pivot is held (a memory dump holds the guest, or a migration runs), or no longer is: ``reason`` (why; ""
            when it no longer waits)
pause       the guest's pause window of the pivot: ``stop_ts``, ``resume_ts``, ``ms`` (QEMU's times)
outcome     the job ended: ``outcome``, ``authoritative``, ``error``, ``disks`` (name, pivoted)
==========  ======================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from blockcopy.records import Operation, Phase, job_state

KINDS = ("created", "state", "goal", "ready", "progress", "speed", "waiting", "pause", "outcome")


@dataclass(frozen=True)
class Event:
    seq: int
    at: float
    kind: str
    job: str
    data: dict[str, Any]


def _progress(op: Operation) -> tuple[int, int]:
    return sum(d.progress_current for d in op.disks), sum(d.progress_total for d in op.disks)


def derive(old: Operation | None, new: Operation, note: str) -> list[tuple[str, dict[str, Any]]]:
    """The events that saving ``new`` over ``old`` (None: the first record) makes, in order."""
    base = {"job": new.id, "domain": new.domain}
    if old is None:
        return [("created", {**base, "goal": new.goal.value, "state": job_state(new),
                             "disks": [{"disk": d.name, "destination": d.dest_path} for d in new.disks]})]
    out: list[tuple[str, dict[str, Any]]] = []
    if new.goal is not old.goal:
        out.append(("goal", {**base, "goal": new.goal.value}))
    if new.bandwidth != old.bandwidth or (new.speed_applied and not old.speed_applied):
        out.append(("speed", {**base, "bandwidth": new.bandwidth, "applied": new.speed_applied}))
    if new.phase is not old.phase:
        out.append(("state", {**base, "phase": new.phase.value, "previous": old.phase.value,
                              "state": job_state(new), "note": note}))
    if new.ready_at is not None and old.ready_at is None:
        out.append(("ready", {**base, "ready_at": new.ready_at}))
    current, total = _progress(new)
    if (current, total) != _progress(old) and new.phase in (Phase.STARTING, Phase.COPYING):
        out.append(("progress", {**base, "current": current, "total": total}))
    if new.waiting != old.waiting:
        out.append(("waiting", {**base, "reason": new.waiting}))
    if new.pause_window_ms is not None and old.pause_window_ms is None:
        out.append(("pause", {**base, "stop_ts": new.stop_ts, "resume_ts": new.resume_ts,
                              "ms": new.pause_window_ms}))
    if new.outcome is not None and old.outcome is None:
        out.append(("outcome", {**base, "outcome": new.outcome.value,
                                "authoritative": new.authoritative.value if new.authoritative else None,
                                "error": new.error,
                                "disks": [{"disk": d.name, "pivoted": d.pivoted} for d in new.disks]}))
    return out
