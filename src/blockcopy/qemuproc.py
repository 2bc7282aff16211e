"""Which QEMU process answers on a QMP socket, and whether that process still exists.

A socket path says little: the file can be removed while QEMU runs on, a listener can refuse a
connection for a moment, and another QEMU can be started on the same path after the first one
exited. blockcopy therefore records *the process* (pid and its start time, which together name
one process for the life of the host) when it connects, from the kernel's SO_PEERCRED of the
connected socket, and decides "QEMU is gone" only when that process no longer exists.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class QemuProcess:
    """One process: a pid alone is reused, pid + start time is not during one boot, and the boot
    id tells one boot from the next (the journal outlives a reboot; an autostarted VM may well get
    the same pid at the same tick). ``pid_ns`` is the PID namespace the pid was seen from: from
    another one, the same number names another process, or none."""

    pid: int
    start_time: int  # /proc/PID/stat field 22: clock ticks after boot
    boot_id: str = ""  # /proc/sys/kernel/random/boot_id when recorded
    pid_ns: int = 0  # inode of the observer's /proc/self/ns/pid when recorded

    def same_as(self, other: QemuProcess | None) -> bool:
        """The same process (what was not recorded, by an older blockcopy, is not compared)."""
        return (other is not None and (self.pid, self.start_time) == (other.pid, other.start_time)
                and (not self.boot_id or not other.boot_id or self.boot_id == other.boot_id)
                and (not self.pid_ns or not other.pid_ns or self.pid_ns == other.pid_ns))

    def state(self) -> str:
        """``alive``, ``gone`` (a zombie, dead but not yet reaped, counts as gone), or ``unknown``
        when this process cannot tell: another PID namespace, a /proc it may not read, an unreadable
        boot id. Only ``gone`` lets anyone conclude that QEMU exited."""
        if self.pid_ns and current_pid_ns() not in (0, self.pid_ns):
            return "unknown"
        boot = current_boot_id()
        if self.boot_id and boot and boot != self.boot_id:
            return "gone"  # the host rebooted since
        if self.boot_id and not boot:
            return "unknown"
        try:
            found = start_time_and_state(self.pid)
        except PermissionError:
            return "unknown"
        if found is None or found[0] != self.start_time or found[1] in ("Z", "X"):
            return "gone"
        return "alive"

    def __str__(self) -> str:
        return f"pid {self.pid}"


def current_boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as boot:
            return boot.read().strip()
    except OSError:
        return ""


def current_pid_ns() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def start_time_and_state(pid: int) -> tuple[int, str] | None:
    """(start time, state) of a process, None when there is no such process.

    :raise PermissionError: /proc does not show it (``hidepid``); other errors propagate too.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            text = stat.read()
    except (FileNotFoundError, ProcessLookupError):
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
    try:
        found = start_time_and_state(pid) if pid > 0 else None
    except OSError:
        return None
    return QemuProcess(pid, found[0], current_boot_id(), current_pid_ns()) if found is not None else None
