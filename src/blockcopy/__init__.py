"""blockcopy: live block copy of running QEMU VM disks with a journaled, crash-safe pivot."""

from blockcopy.driver import Until
from blockcopy.errors import (
                              BlockcopyError,
                              DomainBusy,
                              Interrupted,
                              JournalError,
                              MonitorBusy,
                              MonitorError,
                              NotFound,
                              NotReady,
                              OperationFailed,
                              QemuGone,
                              RequestConflict,
                              StaleRecord,
                              UsageError,
)
from blockcopy.manager import CopyRequest, Manager
from blockcopy.records import Authority, Goal, Operation, Outcome, Phase

__version__ = "0.1.0"

__all__ = [
    "Authority", "BlockcopyError", "CopyRequest", "DomainBusy", "Goal", "Interrupted", "JournalError", "Manager",
    "MonitorBusy", "MonitorError", "NotFound", "NotReady", "Operation", "OperationFailed", "Outcome", "Phase",
    "QemuGone", "RequestConflict", "StaleRecord", "Until", "UsageError", "__version__",
]
