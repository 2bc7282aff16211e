"""Exception classes. Every message says what went wrong *and* what to do about it."""

from __future__ import annotations


class BlockcopyError(Exception):
    """Base class; the CLI prints the message and exits with ``exit_code``."""

    exit_code = 1


class UsageError(BlockcopyError):
    """Bad input: unknown domain, disk or job; a destination that cannot be used."""

    exit_code = 2


class NotFound(UsageError):
    """An unknown domain or job (the API answers 404)."""


class RequestConflict(UsageError):
    """A request id (idempotency key) that was used for a different request (the API answers 409)."""


class JournalError(BlockcopyError):
    """The journal (or the state directory that holds it and the locks) is missing, unreadable,
    unwritable or from a newer blockcopy: the step it was needed for was not taken."""

    exit_code = 3


class StaleRecord(JournalError):
    """A save based on a record that another writer has replaced since: two drivers acted on one
    job. Nothing was saved; the journal holds the other writer's record."""


class MonitorError(BlockcopyError):
    """QMP trouble: the socket is unreachable, busy, or QEMU refused a command."""

    exit_code = 4


class QemuGone(MonitorError):
    """Nothing listens on the QMP socket any more: the QEMU process has exited."""


class NoListener(MonitorError):
    """Nothing accepts connections on the QMP socket (the file is missing or refuses). That alone
    does not prove QEMU exited: see :mod:`blockcopy.qemuproc`."""


class ConnectionLost(MonitorError):
    """The QMP connection closed under a command. QEMU may have exited, or only the connection."""


class QemuUnreachable(MonitorError):
    """The domain's QEMU process still runs, but its QMP socket is missing, refuses connections or
    does not answer: blockcopy decides nothing about its jobs until it can talk to that process."""


class MonitorTimeout(MonitorError):
    """QEMU did not answer a command in time (hung, stopped, or overloaded). The connection is
    dropped: what the command did, if anything, is read from QEMU again once it answers."""


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


class GuestLeftPaused(BlockcopyError):
    """blockcopy paused the guest for a pivot and could not finish it: the outcome could not be
    journaled (e.g. the journal's file system is full), or QEMU stopped answering mid-pivot. The
    guest stays paused on purpose: resuming it before the outcome is durable could let it write to an
    image that the journal does not name. ``blockcopy recover`` finishes the pivot and resumes it."""

    exit_code = 9


class TransitionStalled(BlockcopyError):
    """QEMU did not carry out a finish or abort in time; the job stays unfinished and is retried by
    the next command on the domain or by ``blockcopy recover``."""

    exit_code = 10


class Interrupted(BlockcopyError):
    """The user interrupted a wait for the copy (Ctrl-C); the job itself keeps running in QEMU."""

    exit_code = 130
