"""Terminal presentation shared by the CLI and the demo: job summaries and the progress bar."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

TYPE_CHECKING = False  # (typing.TYPE_CHECKING, without loading typing: see blockcopy/__init__.py)
if TYPE_CHECKING:
    from typing import Any

    from blockcopy.driver import ProgressCallback
    from blockcopy.records import Operation


def describe(op: Operation) -> str:
    from blockcopy import views  # (not loaded by a command through the daemon: it prints views)

    return describe_view(views.operation_view(op))


def describe_view(view: Mapping[str, Any]) -> str:
    """A job for people, from its ``--json`` view (the daemon sends the same view)."""
    lines = [f"job {view['id']}  domain {view['domain']}  state {view['state']}  goal {view['goal']}"]
    for d in view["disks"]:
        prog = d["progress"]
        lines.append(f"  {d['disk']}: {d['source']} -> {d['destination']} ({d['destination_format']})  "
                     f"{_mib(prog['current'])}/{_mib(prog['total'])} ({prog['percent']}%)  "
                     f"job {d['job_status'] or '-'}")
    if view["rate"]:
        lines.append(f"  rate: {_mib(view['rate'])}/s")
    if view["outcome"] is not None:
        lines.append(f"  outcome: {view['outcome']}  authoritative image: {view['authoritative']}")
    if view["reason"]:
        lines.append(f"  {view['reason']}")
    if view["error"]:
        lines.append(f"  error: {view['error']}")
    if view.get("waiting"):  # (a daemon older than the field does not send it)
        lines.append(f"  waiting: {view['waiting']}")
    if view["pause_window_ms"] is not None:
        lines.append(f"  guest pause window: {view['pause_window_ms']:.1f} ms")
    lines.extend(f"  warning: {w}" for w in view["warnings"])
    return "\n".join(lines)


def progress_label(op: Operation) -> str:
    """The progress bar's word for a job that copies (a record, or the daemon's events made one:
    ``service.client.ProgressFromEvents``)."""
    if op.waiting:  # (the journaled reason: protocol.DUMP_WAIT or MIGRATION_WAIT)
        return f"ready, waiting for {'a migration' if 'migration' in op.waiting else 'a memory dump'} to end"
    return "ready" if op.ready_at else "copying"


def _mib(n: float) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


@contextmanager
def progress_display(enabled: bool) -> Iterator[ProgressCallback | None]:
    """A rich progress bar on a terminal; nothing otherwise."""
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                  TransferSpeedColumn(), TimeRemainingColumn(), transient=True,
                  console=None) as bar:
        task = bar.add_task("copying", total=None)

        def update(op: Operation) -> None:
            total = sum(d.progress_total for d in op.disks) or None
            current = sum(d.progress_current for d in op.disks)
            bar.update(task, total=total, completed=current, description=f"{op.id} {progress_label(op)}")

        yield update

