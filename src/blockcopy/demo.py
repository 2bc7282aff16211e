"""``blockcopy demo``: the main job, self-contained, in a scratch directory.

Boots a tiny Linux guest (see :mod:`blockcopy.guest`) whose disk holds data and which keeps
writing self-describing blocks with O_DIRECT, reporting each acknowledged write. blockcopy copies
the disk while the guest writes (progress bar on a terminal) and pivots; the guest writes on. Then
the VM is paused (which flushes) and the image files are checked: the destination holds the data
and every acknowledged write, the old source holds none of the writes made after the pivot.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from blockcopy import views
from blockcopy.driver import Until
from blockcopy.errors import BlockcopyError
from blockcopy.guest.build import GuestBuildError
from blockcopy.guest.session import GuestVM, pick_guest_accel, read_raw, verify, writes_present
from blockcopy.manager import Manager
from blockcopy.records import CopyRequest, Goal, Outcome
from blockcopy.ui import describe, progress_display
from blockcopy.vm import DiskSpec, make_image

MIB = 1024 * 1024
WRITER_SLOTS = 1024  # the guest writes 4 KiB blocks over the disk's first 4 MiB
DATA_START = 8 * MIB  # the rest, from here on, is filled with data before the VM starts


def _fill(path: Path, size: int) -> None:
    """Give every MiB from DATA_START on its own pattern, so a missing or misplaced block shows."""
    commands: list[str] = []
    for mib in range(DATA_START // MIB, size // MIB):
        commands += ["-c", f"write -q -P {(mib % 251) + 1:#x} {mib * MIB} {MIB}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(path)], check=True, capture_output=True)


def _data_problems(raw: bytes, size: int) -> list[str]:
    return [f"data missing at MiB {mib}" for mib in range(DATA_START // MIB, size // MIB)
            if raw[mib * MIB:(mib + 1) * MIB] != bytes([(mib % 251) + 1]) * MIB]


async def _run(workdir: Path, size_mib: int, as_json: bool) -> dict[str, Any]:
    def say(text: str) -> None:
        if not as_json:
            print(text, flush=True)

    size = size_mib * MIB
    source, dest = workdir / "source.qcow2", workdir / "destination.qcow2"
    say(f"blockcopy demo in {workdir}")
    accel = pick_guest_accel()
    make_image(source, size)
    _fill(source, size)
    vm = GuestVM(workdir, [DiskSpec("vda", str(source))], accel=accel, slots=WRITER_SLOTS, name="demo")
    manager = Manager(workdir / "state")
    try:
        booted = time.monotonic()
        vm.acklog.wait_for(1)
        say(f"guest booted ({accel}) in {time.monotonic() - booted:.1f} s and writes to vda "
            f"({size_mib} MiB, {source.name})")
        await manager.attach("demo", str(vm.qmp_socket))
        for _ in range(3):
            time.sleep(0.3)
            say(f"  guest writes acknowledged: {vm.acklog.count()}")
        request = CopyRequest(domain="demo", targets=[("vda", str(dest))], goal=Goal.COPY)
        started = time.monotonic()
        with progress_display(not as_json and sys.stderr.isatty()) as progress:
            op = await manager.copy(request, until=Until.READY, on_progress=progress)
        copy_seconds = time.monotonic() - started
        say(f"copy ready in {copy_seconds:.2f} s; guest writes so far: {vm.acklog.count()}")
        op = await manager.pivot(op.id)
        say(f"pivoted; guest paused {op.pause_window_ms} ms")
        at_pivot = vm.acklog.count()
        vm.acklog.wait_for(at_pivot + 200)
        say(f"  guest writes acknowledged after the pivot: {vm.acklog.count() - at_pivot} (now on "
            f"{vm.device_node('vda')[1]})")
        vm.cmd("stop")  # flushes every image: what the guest wrote is now in the files
        time.sleep(0.2)
        acks = list(vm.acklog.acks)
        raw = read_raw(str(dest), "qcow2")
        checked = verify(str(dest), "qcow2", acks, 0, vm.run_id, data=raw)
        problems = checked.problems + _data_problems(raw, size)
        assert op.stop_ts is not None and op.resume_ts is not None
        after = [a for a in acks if a.at > op.resume_ts + 0.05]
        on_source = writes_present(str(source), "qcow2", after, 0)
        # Two different stalls: the pivot's, and QEMU's flush of the target before `ready`. The
        # pivot's: the largest gap overlapping `stop` to the job's end (the cleanup right after
        # `cont` included, as bench/libvirt_rig.py measures it). No margin before `stop`: the pivot
        # follows `ready` within tens of ms, and a margin caught the end of the flush's gap. A gap
        # that spans `stop` is the pivot's (and also counted before it): the guest waited through
        # both. Before the pivot: from the job's creation to `stop` (copy, flush, pivot's start).
        stall = vm.acklog.max_gap(op.stop_ts, op.ended_at or op.resume_ts)
        copying_stall = vm.acklog.max_gap(op.created_at, op.stop_ts)
        result = {
            "job": views.operation_view(op),
            "accelerator": accel,
            "disk_mib": size_mib,
            "copy_seconds": round(copy_seconds, 3),
            "throughput_mib_s": round(size_mib / copy_seconds, 1) if copy_seconds else None,
            "pause_window_ms": op.pause_window_ms,
            "guest_stall_ms": round(stall * 1000, 1),
            "guest_stall_copying_ms": round(copying_stall * 1000, 1),
            "acknowledged_writes": len(acks),
            "writes_after_pivot": len(after),
            "post_pivot_writes_on_old_source": on_source,
            "problems": problems,
            "verified": (op.outcome is Outcome.PIVOTED and not problems and len(after) > 0 and on_source == 0
                         and checked.checked > 0),
        }
        say(describe(op))
        say(f"verified {len(acks)} acknowledged guest writes ({checked.checked} places) and "
            f"{size_mib - DATA_START // MIB} MiB of data on the destination: "
            + ("all present" if not problems else f"{len(problems)} PROBLEMS: {problems[:5]}"))
        say(f"negative control: {on_source} of {len(after)} post-pivot writes on the old source (expected 0)")
        say(f"summary: copied {size_mib} MiB in {copy_seconds:.2f} s ({result['throughput_mib_s']} MiB/s); "
            f"guest paused {op.pause_window_ms} ms; largest gap between guest writes {stall * 1000:.1f} ms "
            f"around the pivot, {copying_stall * 1000:.1f} ms while copying; "
            f"zero acknowledged writes lost: " + ("VERIFIED" if result["verified"] else "NOT VERIFIED"))
        return result
    finally:
        manager.close()
        vm.kill()


def run_demo(size_mib: int, *, as_json: bool = False, keep: bool = False) -> int:
    """Run the demo; exit status 0 only when the result was verified."""
    if size_mib < 16:
        print("blockcopy demo: --size must be at least 16 MiB", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="blockcopy-demo-"))
    try:
        result = asyncio.run(_run(workdir, size_mib, as_json))
    except (BlockcopyError, GuestBuildError) as exc:
        print(f"blockcopy demo: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0 if result["verified"] else 1


__all__ = ["run_demo"]
