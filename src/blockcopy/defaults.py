"""Defaults and choices that every layer shares, in a module that imports almost nothing.

The CLI builds its parser (help text, choices) from these before it knows whether it will talk to
the daemon or load the core; through the daemon it never loads asyncio, QMP or SQLite, which cost
most of a command's start (``bench/startup.py`` measures it).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # (typing.TYPE_CHECKING, without loading typing: see blockcopy/__init__.py)
if TYPE_CHECKING:
    from pathlib import Path

#: How long QEMU may take to answer one command before blockcopy drops the connection and asks
#: again: no QMP command blockcopy sends takes long; a silent QEMU is hung, stopped or deadlocked.
COMMAND_TIMEOUT = 60.0
#: A transition that QEMU should finish by itself (complete -> pending takes ~8 ms) is given up on
#: after this long without progress; the state machine then rolls back instead of leaving a guest
#: paused. The clock starts when a step's commands have returned, so a slow fsync or a slow command
#: does not count against it; it is also how long blockcopy retries a QEMU that does not answer.
TRANSITION_TIMEOUT = 30.0

MODES = ("write-blocking", "background")
PREALLOCATIONS = ("off", "metadata", "falloc", "full")
FORMATS = ("qcow2", "raw")
MIB = 1024 * 1024
MAX_BUF_SIZE = 1024 * MIB
#: The mirror's buffer, from runs on libvirt's rig (README, Benchmarks): the guest's largest stall
#: in the last second before `ready` was 158 ms median with 4 MiB against 263 ms with 16 MiB and
#: libvirt's 439 ms (one 5-run stall run); 16 MiB copies random data 1.05-1.21x faster than 4 MiB,
#: 1 MiB 1.2-1.3x slower (one 7-rep run). 4 MiB gives up that speed for the shorter stall and
#: still copies faster than libvirt.
DEFAULT_BUF_SIZE = 4 * MIB
#: How long a client's idempotency key may be.
CLIENT_KEY_MAX = 200


def default_buf_size(bandwidth: int) -> int:
    """DEFAULT_BUF_SIZE, or one second's worth of a speed limit when that is less (at least 1 MiB).

    QEMU's mirror limits its speed by sleeping *after* it copied a buffer's worth: with 16 MiB in
    flight, `--bandwidth 1` would copy 16 MiB at full speed, then pause 16 s; the storage the limit
    is there to protect would see full-speed bursts."""
    if not bandwidth:
        return DEFAULT_BUF_SIZE
    return max(MIB, min(DEFAULT_BUF_SIZE, bandwidth))


def default_state_dir() -> Path:
    """``$BLOCKCOPY_STATE_DIR``, else /var/lib/blockcopy for root, else the XDG state directory."""
    from pathlib import Path

    return Path(default_state_path())


def default_state_path() -> str:
    """:func:`default_state_dir` as a string, for the daemon's client (which does not load pathlib)."""
    env = os.environ.get("BLOCKCOPY_STATE_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/blockcopy"
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(xdg, "blockcopy")
