"""blockcopy: live block copy of running QEMU VM disks with a journaled, crash-safe pivot.

The names below are loaded when first used (PEP 562): ``import blockcopy.cli`` for a command that
goes through the daemon must not load asyncio, QMP and SQLite, which cost most of its start.
"""

from __future__ import annotations

#: ``typing.TYPE_CHECKING`` without loading typing (4-6 ms of its own in one-off readings on the test machine;
#: the modules a command through the daemon loads do the same). mypy treats the name as True.
TYPE_CHECKING = False

__version__ = "0.1.0"

_WHERE = {
    "Until": "blockcopy.driver",
    "CopyRequest": "blockcopy.records", "Authority": "blockcopy.records", "Goal": "blockcopy.records",
    "Operation": "blockcopy.records", "Outcome": "blockcopy.records", "Phase": "blockcopy.records",
    "Manager": "blockcopy.manager",
    **{name: "blockcopy.errors" for name in (
        "BlockcopyError", "DomainBusy", "Interrupted", "JournalError", "MonitorBusy", "MonitorError", "NotFound",
        "NotReady", "OperationFailed", "QemuGone", "RequestConflict", "StaleRecord", "UsageError")},
}

__all__ = [
    "Authority", "BlockcopyError", "CopyRequest", "DomainBusy", "Goal", "Interrupted", "JournalError", "Manager",
    "MonitorBusy", "MonitorError", "NotFound", "NotReady", "Operation", "OperationFailed", "Outcome", "Phase",
    "QemuGone", "RequestConflict", "StaleRecord", "Until", "UsageError", "__version__",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'blockcopy' has no attribute {name!r}")
    import importlib  # (here: with warnings, what it loads, not part of a command's start)

    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from typing import Any

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
    from blockcopy.manager import Manager
    from blockcopy.records import Authority, CopyRequest, Goal, Operation, Outcome, Phase
