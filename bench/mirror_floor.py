"""How fast QEMU's own mirror can copy on libvirt's rig, against `qemu-img convert` (issue 11).

    .venv/bin/python bench/mirror_floor.py [--reps N] [--size-mib N]

Not part of `make test`. Issue 11 asks for `blockcopy copy --pivot` at 0.9x the throughput of
`qemu-img convert`. blockcopy's copy *is* QEMU's mirror job; this measures that job with no
blockcopy around it, on the disk of a VM started as libvirt starts a `cache='none'` qcow2 disk
(file and qcow2 nodes with cache.direct=on, aio threads, virtio-blk, i440fx; KVM when it works, no
guest OS), so that the figure for blockcopy can be read against what the job itself
can do here. Per rep, in a balanced order (libvirt_rig.rep_order; partial: 5 reps over 6 rows),
each on a fresh VM left until QEMU is idle (libvirt_rig.wait_until_idle), after `sync; echo 3 > drop_caches`:

  qemu-img             qemu-img convert -O qcow2 SRC DEST; sync -f DEST (end to end, as users time it)
  blockcopy            blockcopy copy vm virtio-disk0 DEST --pivot; sync -f DEST (end to end; the CLI
                       pip-installed as users install it, `attach` not timed, no daemon)
  mirror-SIZE          blockdev-mirror sync=full (background copy mode) of the VM's cache=none disk
                       into a new qcow2 DEST opened through the page cache, as blockcopy opens it
                       for a pivot with --page-cache-fill (protocol._copy_through_page_cache) but without blockcopy's
                       destination writeback (writeback.py) and its write-blocking mode; buf-size
                       SIZE: 4M (blockcopy's default) and 16M (QEMU's and libvirt's)
  mirror-direct-16M    the same with DEST opened with cache.direct=on, as libvirt 9.0 opens it (and
                       blockcopy by default since 2026-11-27 evening)
  mirror-cached-src-16M  the VM's disk *not* cache=none (page cache, readahead): not libvirt's rig,
                       the control for what reading a cache=none source costs

The mirror phase is job created -> BLOCK_JOB_READY by QEMU's event times, read on a passive QMP
monitor (bench/libvirt_rig.py's EventTap); QEMU flushes DEST before it reports ready, so the copy is
durable then, as after qemu-img's `sync -f`. Ratios are throughput relative to qemu-img's in the same
rep (qemu-img's seconds over the other's): end to end for blockcopy, mirror phase for the raw
variants and for "blockcopy mirror phase" (a mirror phase leaves out DEST's creation and the job's
completion, which qemu-img's run includes: it favours the mirror). blockcopy's DEST is checked
equal to the source; the raw variants' DESTs are not checked.
Writes bench/results/mirror_floor.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from libvirt_rig import (
    MIB,
    RESULTS,
    EventTap,
    blockcopy_cli,
    drop_caches,
    images_equal,
    make_source,
    rep_order,
    run,
    timed,
    tool_command,
    wait_until_idle,
)

from blockcopy.vm import pick_accel

#: name -> (source cache.direct, DEST cache.direct, buf-size)
VARIANTS: dict[str, tuple[bool, bool, int]] = {
    "mirror-4M": (True, False, 4 * MIB),
    "mirror-16M": (True, False, 16 * MIB),
    "mirror-direct-16M": (True, True, 16 * MIB),
    "mirror-cached-src-16M": (False, False, 16 * MIB),
}


def vm_args(source: Path, work: Path, accel: str, source_direct: bool) -> list[str]:
    """libvirt 9.0's -blockdev pair for a cache='none' qcow2 disk (bench/libvirt_rig.py reads it from
    libvirt itself; the rest of libvirt's command line, -boot, USB, memory backend, is left out),
    on a running VM with no guest OS (firmware only, as in libvirt_rig's throughput mode; blockcopy
    refuses a VM that has not started). Two QMP sockets: the tap (events, and the
    raw variants' commands) and blockcopy's."""
    cache = {"direct": source_direct, "no-flush": False}
    storage = {"driver": "file", "filename": str(source), "node-name": "libvirt-1-storage", "cache": cache,
               "auto-read-only": True, "discard": "unmap"}
    fmt = {"node-name": "libvirt-1-format", "read-only": False, "cache": cache, "driver": "qcow2",
           "file": "libvirt-1-storage", "backing": None}
    disk = {"driver": "virtio-blk-pci", "drive": "libvirt-1-format", "id": "virtio-disk0", "write-cache": "on"}
    return ["qemu-system-x86_64", "-machine", "pc-i440fx-7.2", "-accel", accel, "-cpu", "qemu64", "-m", "256",
            "-display", "none", "-nodefaults", "-no-user-config", "-blockdev", json.dumps(storage),
            "-blockdev", json.dumps(fmt), "-device", json.dumps(disk),
            "-qmp", f"unix:{work / 'tap.qmp'},server=on,wait=off",
            "-qmp", f"unix:{work / 'blockcopy.qmp'},server=on,wait=off"]


def mirror_phase(tap: EventTap) -> float:
    created, ready = tap.mirror_times()
    if created is None or ready is None:
        raise RuntimeError(f"no mirror job created and ready: {[e['event'] for e in tap.events]}")
    return ready - created


def run_tool(work: Path, source: Path, size_mib: int, accel: str, tool: str, cli: list[str]) -> dict[str, float]:
    """One copy of SOURCE by ``tool`` on a fresh VM; ``mirror_s``: job created -> BLOCK_JOB_READY
    (QEMU's clock; QEMU flushes DEST before it reports ready); ``seconds`` for blockcopy: its
    command start to `sync -f DEST` done."""
    source_direct, dest_direct, buf_size = VARIANTS.get(tool, (True, False, 0))
    dest = work / "dest.qcow2"
    for path in (work / "tap.qmp", work / "blockcopy.qmp", dest):
        path.unlink(missing_ok=True)
    shutil.rmtree(work / "state", ignore_errors=True)
    qemu = subprocess.Popen(vm_args(source, work, accel, source_direct), stderr=subprocess.DEVNULL)
    tap = None
    try:
        tap = EventTap(work / "tap.qmp", alive=lambda: qemu.poll() is None)
        wait_until_idle(qemu.pid)  # (the firmware spins a vCPU for its first seconds, see there)
        result: dict[str, float] = {}
        if tool == "blockcopy":
            run([*cli, "attach", "vm", "--qmp", str(work / "blockcopy.qmp"), "--state-dir", str(work / "state")])
            drop_caches()
            seconds, _start, _end, _proc = timed([*cli, "copy", "vm", "virtio-disk0", str(dest), "--pivot",
                                                  "--state-dir", str(work / "state")], dest)
            result["seconds"] = seconds
        else:
            run(["qemu-img", "create", "-q", "-f", "qcow2", str(dest), f"{size_mib}M"])
            drop_caches()
            cache = {"direct": dest_direct, "no-flush": False}
            tap.command("blockdev-add", {"driver": "qcow2", "node-name": "dest", "cache": cache,
                                         "file": {"driver": "file", "filename": str(dest), "cache": cache}})
            tap.command("blockdev-mirror", {"job-id": "floor", "device": "libvirt-1-format", "target": "dest",
                                            "sync": "full", "buf-size": buf_size, "auto-finalize": False,
                                            "auto-dismiss": False})
            deadline = time.monotonic() + 600
            while tap.first("BLOCK_JOB_READY") is None:
                if tap.first("BLOCK_JOB_COMPLETED") or tap.first("BLOCK_JOB_ERROR") or time.monotonic() > deadline:
                    raise RuntimeError(f"mirror ended without READY: {tap.events[-3:]}")
                time.sleep(0.01)
        result["mirror_s"] = mirror_phase(tap)
    finally:
        if tap is not None:
            tap.close()
        qemu.kill()
        qemu.wait()
    if tool == "blockcopy" and not images_equal(source, dest):
        raise RuntimeError("blockcopy's DEST differs from the source")
    dest.unlink(missing_ok=True)
    return result


def qemu_img(work: Path, source: Path) -> dict[str, float]:
    dest = work / "dest.qcow2"
    dest.unlink(missing_ok=True)
    seconds = tool_command(["qemu-img", "convert", "-O", "qcow2", str(source), str(dest)], dest)["seconds"]
    dest.unlink()
    return {"seconds": seconds}


def bench(work: Path, reps: int, size_mib: int) -> dict[str, Any]:
    source = work / "source.qcow2"
    make_source(source, size_mib, sparse=False)
    accel, cli = pick_accel(), blockcopy_cli()
    names = ["qemu-img", "blockcopy", *VARIANTS]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for rep in range(reps):
        for name in rep_order(names, rep):
            result = qemu_img(work, source) if name == "qemu-img" else run_tool(work, source, size_mib, accel,
                                                                               name, cli)
            runs[name].append({k: round(v, 3) for k, v in result.items()})
            print(f"  rep {rep} {name:>22}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)
    reference = [r["seconds"] for r in runs["qemu-img"]]
    # Throughput relative to qemu-img's, per rep: end to end for blockcopy, the mirror phase for the rest.
    ratios = {name: [round(q / r.get("seconds", r["mirror_s"]), 3) for q, r in zip(reference, runs[name], strict=True)]
              for name in names[1:]}
    ratios["blockcopy mirror phase"] = [round(q / r["mirror_s"], 3)
                                        for q, r in zip(reference, runs["blockcopy"], strict=True)]
    medians = {name: {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}
               for name, rows in runs.items()}
    print(f"\n{'':>22}  median s (end to end; mirror phase)  vs qemu-img (median of per-rep ratios)")
    for name in [*names, "blockcopy mirror phase"]:
        ratio = f"{statistics.median(ratios[name]):.3f}" if name in ratios else "1"
        print(f"{name:>22}  {json.dumps(medians.get(name, {})):40}  {ratio}")
    return {"size_mib": size_mib, "reps": reps, "accel": accel, "runs": runs, "medians": medians,
            "ratio_to_qemu_img_per_rep": ratios,
            "ratio_to_qemu_img_median": {name: round(statistics.median(v), 3) for name, v in ratios.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="reps per variant (default 5)")
    parser.add_argument("--size-mib", type=int, default=1024, help="random data in the source (default 1024)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="where images go")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root (drop_caches)")
    with tempfile.TemporaryDirectory(prefix="bc-floor-", dir=args.workdir) as tmp:
        result = bench(Path(tmp), args.reps, args.size_mib)
    result["environment"] = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                             "host": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
                             "qemu": subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                                                    text=True).stdout.splitlines()[0],
                             "workdir": str(args.workdir),
                             "commit": subprocess.run(["git", "-C", str(Path(__file__).parent), "describe",
                                                       "--always", "--dirty"], capture_output=True,
                                                      text=True).stdout.strip()}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "mirror_floor.json"
    out.write_text(json.dumps(result, indent=2, sort_keys=True))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
