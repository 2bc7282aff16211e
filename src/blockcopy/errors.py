"""Exception classes. Every message says what went wrong *and* what to do about it."""

from __future__ import annotations


class BlockcopyError(Exception):
    """Base class; the CLI prints the message and exits with ``exit_code``."""

    exit_code = 1


class UsageError(BlockcopyError):
    """Bad input: unknown domain, disk or job; a destination that cannot be used."""

    exit_code = 2


class JournalError(BlockcopyError):
    """The journal is missing, unreadable or from a newer blockcopy: nothing was touched."""

    exit_code = 3


class MonitorError(BlockcopyError):
    """QMP trouble: the socket is unreachable, busy, or QEMU refused a command."""

    exit_code = 4


class QemuGone(MonitorError):
    """Nothing listens on the QMP socket any more: the QEMU process has exited."""


class MonitorBusy(MonitorError):
    """Another client holds the QMP socket (QEMU serves one client per socket)."""


class DomainBusy(BlockcopyError):
    """Another blockcopy process is working on the domain."""

    exit_code = 5


class NotReady(BlockcopyError):
    """A pivot or finish was asked for before every mirror job was ready."""

    exit_code = 6


class OperationFailed(BlockcopyError):
    """The operation ended with outcome ``failed``; the journal says why and which image to trust."""

    exit_code = 7


class RecoveryIncomplete(BlockcopyError):
    """``recover`` could not reach some domains (busy socket, another blockcopy); others were recovered."""

    exit_code = 8
