"""Which QEMU process answers on a QMP socket, and whether that process still exists.

A socket path says little: the file can be removed while QEMU runs on, a listener can refuse a
connection for a moment, and another QEMU can be started on the same path after the first one
exited. blockcopy therefore records *the process* (pid and its start time, which together name
one process for the life of the host) when it connects, from the kernel's SO_PEERCRED of the
connected socket, and decides "QEMU is gone" only when that process no longer exists.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class QemuProcess:
    """One process: a pid alone is reused, pid + start time is not during one boot, and the boot
    id tells one boot from the next (the journal outlives a reboot; an autostarted VM may well get
    the same pid at the same tick)."""

    pid: int
    start_time: int  # /proc/PID/stat field 22: clock ticks after boot
    boot_id: str = ""  # /proc/sys/kernel/random/boot_id when recorded

    def exists(self) -> bool:
        """True while the process runs (a zombie, dead but not yet reaped, counts as gone)."""
        if self.boot_id and self.boot_id != current_boot_id():
            return False
        found = start_time_and_state(self.pid)
        return found is not None and found[0] == self.start_time and found[1] not in ("Z", "X")

    def __str__(self) -> str:
        return f"pid {self.pid}"


def current_boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as boot:
            return boot.read().strip()
    except OSError:
        return ""


def start_time_and_state(pid: int) -> tuple[int, str] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            text = stat.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces or ')'.
    fields = text[text.rfind(")") + 2:].split()
    return int(fields[19]), fields[0]  # field 22 (starttime) and field 3 (state)


def peer_process(sock: socket.socket) -> QemuProcess | None:
    """The process that listens on the other end of a connected unix socket (SO_PEERCRED)."""
    try:
        pid, _uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError:
        return None
    found = start_time_and_state(pid) if pid > 0 else None
    return QemuProcess(pid, found[0], current_boot_id()) if found is not None else None
