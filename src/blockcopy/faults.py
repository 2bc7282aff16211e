"""Deterministic fault points for tests. Inert unless one of the variables below is set.

Names are ``journal:<phase>`` (after a journaled protocol step in that phase, e.g.
``journal:pivoting``), ``qmp:<command>`` (after QEMU answered it, e.g. ``qmp:job-complete``),
plus ``create-image``, ``sync-images``, ``compare-images`` and ``run-state`` (the pivot read the guest
running, just before its ``stop``). ``NAME@N`` is the N-th time the
point is reached (1-based; default 1).

- ``BLOCKCOPY_CRASH_AT=NAME[@N][,...]``: SIGKILL the process right after the point.
- ``BLOCKCOPY_FAULT_AT=NAME[@N]=ACTION[,...]``: ``kill`` (as above), ``stop`` (SIGSTOP itself, so a
  test can change the world, e.g. fill the journal's file system, then SIGCONT it), or
  ``sleep:SECONDS`` (the step took that much longer, e.g. a slow fsync). ``o-tmpfile=fail`` makes
  the file system look as if it had no O_TMPFILE (see :func:`fails`).
- ``BLOCKCOPY_TRACE_POINTS=FILE`` appends every point reached, as ``NAME@N``, to FILE: the tests use
  it to enumerate the crash points of a command.

While a fault is armed, commands that the driver would send to QEMU together (one batch) go one
at a time, so that a point can fall *between* two commands of a batch (e.g. after ``job-finalize``
of disk 1 and before disk 2): see :func:`serial`. ``BLOCKCOPY_FAULT_SERIAL=0`` keeps the batches
(and ``stop`` with the job-completes written behind it) as they go without a fault, for a test of
that path.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

ENV = "BLOCKCOPY_CRASH_AT"
FAULT_ENV = "BLOCKCOPY_FAULT_AT"
TRACE_ENV = "BLOCKCOPY_TRACE_POINTS"
SERIAL_ENV = "BLOCKCOPY_FAULT_SERIAL"
_seen: Counter[str] = Counter()


def _armed() -> list[tuple[str, int, str]]:
    """(point, nth, action) for every armed fault."""
    faults = []
    for item in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(","))):
        wanted, _, nth = item.partition("@")
        faults.append((wanted, int(nth or 1), "kill"))
    for item in filter(None, (s.strip() for s in os.environ.get(FAULT_ENV, "").split(","))):
        where, _, action = item.partition("=")
        wanted, _, nth = where.partition("@")
        faults.append((wanted, int(nth or 1), action or "kill"))
    return faults


def _any_armed() -> bool:
    return bool(os.environ.get(ENV) or os.environ.get(FAULT_ENV))


def serial() -> bool:
    """True while a fault is armed (unless SERIAL_ENV is 0): batches then go to QEMU one command at a time."""
    return _any_armed() and os.environ.get(SERIAL_ENV) != "0"


def fails(name: str) -> bool:
    """True when a test asked ``NAME=fail``: the code then takes its path for a missing feature."""
    return any(wanted == name and action == "fail" for wanted, _nth, action in _armed())


def point(name: str) -> None:
    trace = os.environ.get(TRACE_ENV)
    if not trace and not _any_armed():
        return
    _seen[name] += 1
    if trace:
        with open(trace, "a", encoding="utf-8") as out:
            out.write(f"{name}@{_seen[name]}\n")
    for wanted, nth, action in _armed():
        if wanted != name or _seen[name] != nth:
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif action.startswith("sleep:"):
            time.sleep(float(action.removeprefix("sleep:")))
