"""``blockcopy demo``: the main job, self-contained, in a scratch directory.

Starts a QEMU VM whose disk is full of data, keeps writing to it through the virtio device while
blockcopy copies it (progress bar on a terminal), pivots, verifies on the image files that the
destination holds the original data and every acknowledged write, prints a summary and cleans up.

The writes are injected from a second QMP monitor (HMP ``qemu-io``), which cannot run while a
mirror job is ``pending``; the writer therefore pauses for the pivot (milliseconds).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from blockcopy import views
from blockcopy.driver import Until
from blockcopy.errors import BlockcopyError
from blockcopy.manager import CopyRequest, Manager
from blockcopy.records import Goal, Outcome
from blockcopy.ui import describe, progress_display
from blockcopy.vm import DiskSpec, ScratchVM, image_has_pattern, make_image, pick_accel

MIB = 1024 * 1024
MARKER = 64 * 1024


class MarkerWriter(threading.Thread):
    """Writes distinct patterns through the device and remembers each acknowledged one."""

    def __init__(self, vm: ScratchVM, disk: str, size: int, first_pattern: int) -> None:
        super().__init__(daemon=True)
        self.vm, self.disk, self.size = vm, disk, size
        self.pattern = first_pattern
        self.acked: dict[int, int] = {}  # offset -> pattern of the last acknowledged write there
        self.errors: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        slot = 0
        while not self._halt.is_set():
            offset = (slot * 7919 * MARKER) % self.size
            try:
                self.vm.write_marker(self.disk, self.pattern, offset, MARKER)
            except Exception as exc:
                self.errors.append(str(exc))
                return
            self.acked[offset] = self.pattern
            self.pattern = self.pattern % 0xFE + 1
            slot += 1
            time.sleep(0.02)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


def _fill(path: Path, size: int) -> None:
    """Give every MiB its own pattern, so a misplaced or missing block shows."""
    commands: list[str] = []
    for mib in range(size // MIB):
        commands += ["-c", f"write -q -P {(mib % 251) + 1:#x} {mib * MIB} {MIB}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(path)], check=True, capture_output=True)


def _verify(path: str, size: int, acked: dict[int, int]) -> tuple[int, list[str]]:
    problems = []
    for mib in range(size // MIB):
        # Skip MiBs that markers overwrote; their markers are checked below.
        if any(mib * MIB <= off < (mib + 1) * MIB for off in acked):
            continue
        if not image_has_pattern(path, "qcow2", (mib % 251) + 1, mib * MIB, MIB):
            problems.append(f"original data missing at MiB {mib}")
    for offset, pattern in sorted(acked.items()):
        if not image_has_pattern(path, "qcow2", pattern, offset, MARKER):
            problems.append(f"acknowledged write {pattern:#x} at {offset} missing")
    return len(acked), problems


async def _run(workdir: Path, size_mib: int, as_json: bool) -> dict[str, Any]:
    size = size_mib * MIB
    source, dest = workdir / "source.qcow2", workdir / "destination.qcow2"

    def say(text: str) -> None:
        if not as_json:
            print(text, flush=True)

    say(f"blockcopy demo in {workdir}")
    make_image(source, size)
    _fill(source, size)
    accel = pick_accel()
    vm = ScratchVM(workdir, [DiskSpec("vda", str(source))], name="demo", accel=accel)
    manager = Manager(workdir / "state")
    try:
        await manager.attach("demo", str(vm.qmp_socket))
        say(f"VM running ({accel}), disk vda: {size_mib} MiB of data in {source.name}")
        writer = MarkerWriter(vm, "vda", size, first_pattern=1)
        writer.start()
        request = CopyRequest(domain="demo", targets=[("vda", str(dest))], goal=Goal.COPY)
        started = time.monotonic()
        with progress_display(not as_json and sys.stderr.isatty()) as progress:
            op = await manager.copy(request, until=Until.READY, on_progress=progress)
        copy_seconds = time.monotonic() - started
        time.sleep(0.2)  # a few more writes while ready: they reach both images (write-blocking)
        writer.stop()
        before_pivot = dict(writer.acked)
        say(f"copy ready in {copy_seconds:.2f} s; {len(before_pivot)} guest writes acknowledged so far")
        op = await manager.pivot(op.id)
        after = MarkerWriter(vm, "vda", size, first_pattern=writer.pattern)
        after.start()
        time.sleep(0.5)
        after.stop()
        node, file = vm.device_node("vda")
        acked = {**before_pivot, **after.acked}
        checked, problems = _verify(str(dest), size, acked)
        post_pivot_on_source = sum(image_has_pattern(str(source), "qcow2", p, o, MARKER)
                                   for o, p in after.acked.items() if before_pivot.get(o) != p)
        result = {
            "job": views.operation_view(op),
            "device_now_uses": file,
            "accelerator": accel,
            "disk_mib": size_mib,
            "copy_seconds": round(copy_seconds, 3),
            "throughput_mib_s": round(size_mib / copy_seconds, 1) if copy_seconds else None,
            "pause_window_ms": op.pause_window_ms,
            "acknowledged_writes": checked,
            "writes_after_pivot": len(after.acked),
            "post_pivot_writes_found_on_source": post_pivot_on_source,
            "writer_errors": writer.errors + after.errors,
            "problems": problems,
            "verified": (op.outcome is Outcome.PIVOTED and file == str(dest) and not problems
                         and not writer.errors and not after.errors and len(after.acked) > 0),
        }
        if not as_json:
            say(describe(op))
            say(f"device vda now uses {file} (node {node})")
            say(f"writes after the pivot: {len(after.acked)}, all on the destination; "
                f"{post_pivot_on_source} of them on the old source (expected 0)")
            say(f"verified the last acknowledged write at each of {checked} places and "
                f"{size_mib} MiB of original data: "
                + ("all present" if not problems else f"{len(problems)} PROBLEMS: {problems[:5]}"))
            say(f"summary: copied {size_mib} MiB in {copy_seconds:.2f} s "
                f"({result['throughput_mib_s']} MiB/s), guest paused {op.pause_window_ms} ms for the pivot: "
                + ("VERIFIED" if result["verified"] else "NOT VERIFIED"))
        return result
    finally:
        manager.close()
        vm.quit()


def run_demo(size_mib: int, *, as_json: bool = False, keep: bool = False) -> int:
    """Run the demo; exit status 0 only when the result was verified."""
    workdir = Path(tempfile.mkdtemp(prefix="blockcopy-demo-"))
    try:
        result = asyncio.run(_run(workdir, size_mib, as_json))
    except BlockcopyError as exc:
        print(f"blockcopy demo: error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        if keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0 if result["verified"] else 1
