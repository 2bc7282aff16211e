"""Deterministic crash points for tests: ``BLOCKCOPY_CRASH_AT=NAME[,NAME...]`` makes the process
SIGKILL itself right after the named protocol step. Inert unless the variable is set.

Names are ``journal:<phase>`` (after a journal write that entered or stayed in that phase, e.g.
``journal:pivoting``) and ``qmp:<command>`` (after QEMU answered it, e.g. ``qmp:job-complete``),
plus ``create-image``. ``NAME@N`` crashes at the N-th time the point is reached (1-based).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "BLOCKCOPY_CRASH_AT"
_seen: Counter[str] = Counter()


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    _seen[name] += 1
    for item in spec.split(","):
        wanted, _, nth = item.strip().partition("@")
        if wanted == name and _seen[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
