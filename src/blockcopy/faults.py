"""Deterministic crash points for tests: ``BLOCKCOPY_CRASH_AT=NAME[,NAME...]`` makes the process
SIGKILL itself right after the named protocol step. Inert unless the variable is set.

Names are ``journal:<phase>`` (after a journaled protocol step in that phase, e.g.
``journal:pivoting``) and ``qmp:<command>`` (after QEMU answered it, e.g. ``qmp:job-complete``),
plus ``create-image``. ``NAME@N`` crashes at the N-th time the point is reached (1-based).

``BLOCKCOPY_TRACE_POINTS=FILE`` appends every point reached, as ``NAME@N``, to FILE: the tests use
it to enumerate the crash points of a command.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "BLOCKCOPY_CRASH_AT"
TRACE_ENV = "BLOCKCOPY_TRACE_POINTS"
_seen: Counter[str] = Counter()


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    trace = os.environ.get(TRACE_ENV)
    if not spec and not trace:
        return
    _seen[name] += 1
    if trace:
        with open(trace, "a", encoding="utf-8") as out:
            out.write(f"{name}@{_seen[name]}\n")
    if not spec:
        return
    for item in spec.split(","):
        wanted, _, nth = item.strip().partition("@")
        if wanted == name and _seen[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
