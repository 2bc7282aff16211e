"""The ``--json`` interface: stable field names for management apps (documented in the README).

Add fields freely; never rename or remove one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blockcopy.records import Authority, DiskRecord, Goal, Operation, Phase, job_state

if TYPE_CHECKING:  # (the CLI shows views from the daemon without loading the journal or QMP)
    from blockcopy.journal import Domain
    from blockcopy.monitor import DeviceInfo


def _progress(current: int, total: int) -> dict[str, Any]:
    return {"current": current, "total": total,
            "percent": round(100.0 * current / total, 1) if total else 0.0}


def _disk_authority(op: Operation, disk: DiskRecord) -> str | None:
    if op.authoritative is None:
        return None
    if op.authoritative is Authority.MIXED:
        return "destination" if disk.pivoted else "source"
    if op.authoritative is Authority.UNKNOWN and op.identical is not None:
        index = op.disks.index(disk)
        return "both" if index < len(op.identical) and op.identical[index] else "unknown"
    return op.authoritative.value


def operation_view(op: Operation) -> dict[str, Any]:
    current = sum(d.progress_current for d in op.disks)
    total = sum(d.progress_total for d in op.disks)
    end = op.ready_at or op.ended_at or op.updated_at
    elapsed = (end - op.created_at) if end and op.created_at else 0.0
    return {
        "id": op.id,
        "domain": op.domain,
        "disk": ",".join(d.name for d in op.disks),
        "state": job_state(op),
        "phase": op.phase.value,
        "goal": op.goal.value,
        "mode": op.mode,
        "shallow": op.shallow,
        "reuse_external": op.reuse_external,
        "bandwidth": op.bandwidth,
        "buf_size": op.buf_size,
        "page_cache_fill": op.page_cache_fill,
        "outcome": op.outcome.value if op.outcome else None,
        "authoritative": op.authoritative.value if op.authoritative else None,
        "reason": op.reason,
        "error": op.error,
        "warnings": list(op.warnings),
        "waiting": op.waiting if op.phase is Phase.COPYING and op.goal is Goal.PIVOT and op.waiting else None,
        "progress": _progress(current, total),
        "rate": round(current / elapsed) if elapsed > 0 else None,
        "pause_window_ms": op.pause_window_ms,
        "paused_by_blockcopy": op.paused_by_us,
        "created_at": op.created_at,
        "ready_at": op.ready_at,
        "updated_at": op.updated_at,
        "ended_at": op.ended_at,
        "disks": [
            {
                "disk": d.name,
                "job_id": d.job_id,
                "job_status": d.job_status,
                "source": d.source_file,
                "source_format": d.source_format,
                "destination": d.dest_path,
                "destination_format": d.dest_format,
                "destination_created": d.dest_created,
                "progress": _progress(d.progress_current, d.progress_total),
                "pivoted": d.pivoted,
                "consistent": d.consistent,
                "authoritative": _disk_authority(op, d),
            }
            for d in op.disks
        ],
    }


def device_view(device: DeviceInfo) -> dict[str, Any]:
    return {
        "disk": device.name,
        "qdev": device.qdev_id,
        "drive": device.drive_id,
        "node": device.node,
        "format": device.format,
        "image": device.file,
        "backing_chain": list(device.backing_chain),
        "virtual_size": device.virtual_size,
        "read_only": device.read_only,
    }


def domain_view(domain: Domain) -> dict[str, Any]:
    return {"domain": domain.name, "qmp_socket": domain.qmp_socket, "attached_at": domain.attached_at,
            "qemu_pid": domain.qemu_pid}
