"""blockcopy benchmarks: figures, never pass/fail. `make bench` or `python bench/run.py [NAME ...]`.

Each benchmark prints a table and writes JSON (and a PNG where a picture reads better) to
bench/results/. Every result records the QEMU version, accelerator and file system it ran on.

  pause       guest pause window of a pivot (QEMU STOP/RESUME timestamps), idle and with
              16/64/256 MiB written just before the pivot, 1 and 4 disks
  throughput  copy of a running VM's disk vs `qemu-img convert` and `cp --sparse=always`
  modes       time to ready and guest write latency, write-blocking vs background, guest writing
  cost        CPU seconds and peak RSS of blockcopy per job with 1/10/30 concurrent jobs;
              `recover` time with 1/10/100 unfinished jobs
  qmp         QMP round trip against the length of the command (why blockcopy keeps the
              commands it sends while the guest is paused short)
  libvirt     blockcopy vs `virsh blockcopy` on libvirt's own rig, same run (bench/libvirt_rig.py:
              installs and starts libvirt; only when named, never part of the default set)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blockcopy import CopyRequest, Manager, Until
from blockcopy.records import Goal
from blockcopy.vm import DiskSpec, ScratchVM, make_image, pick_accel

MIB = 1024 * 1024
RESULTS = Path(__file__).with_name("results")


def environment(workdir: Path) -> dict[str, Any]:
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    fs = subprocess.run(["findmnt", "-no", "FSTYPE,SOURCE", "-T", str(workdir)], capture_output=True,
                        text=True).stdout.strip()
    return {"qemu": qemu, "accel": pick_accel(), "filesystem": fs, "kernel": platform.release(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M")}


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pick(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]

    return {"n": len(values), "median": round(statistics.median(ordered), 2), "p95": round(pick(0.95), 2),
            "p99": round(pick(0.99), 2), "max": round(ordered[-1], 2)}


def save(name: str, data: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2, sort_keys=True))
    print(f"wrote {RESULTS / (name + '.json')}")


# --- pause window ------------------------------------------------------------------------------


async def _pause_series(workdir: Path, disks: int, dirty_mib: int, pivots: int) -> list[float]:
    size = max(64, dirty_mib + 64) * MIB
    specs = [DiskSpec(f"vd{chr(97 + i)}", str(make_image(workdir / f"d{i}.qcow2", size))) for i in range(disks)]
    vm = ScratchVM(workdir, specs, name="pause", accel=pick_accel())
    manager = Manager(workdir / "state")
    windows = []
    try:
        await manager.attach("pause", str(vm.qmp_socket))
        previous: list[Path] = []
        for n in range(pivots):
            dests = [workdir / f"p{n}-{i}.qcow2" for i in range(disks)]
            request = CopyRequest("pause", [(s.id, str(d)) for s, d in zip(specs, dests, strict=True)])
            op = await manager.copy(request, until=Until.READY)
            if dirty_mib:
                for i, spec in enumerate(specs):  # guest-like writes, acknowledged but not flushed
                    vm.qemu_io(spec.id, f"aio_write -P {(n + i) % 250 + 1} 0 {dirty_mib}M")
                    vm.qemu_io(spec.id, "aio_flush")
            op = await manager.pivot(op.id)
            assert op.pause_window_ms is not None, op
            windows.append(op.pause_window_ms)
            for old in previous:
                old.unlink(missing_ok=True)
            previous = dests
    finally:
        manager.close()
        vm.kill()
    return windows


def bench_pause(args: argparse.Namespace) -> None:
    results = []
    print(f"{'disks':>5} {'dirty MiB':>9} {'n':>4} {'median':>8} {'p95':>8} {'p99':>8} {'max':>8}  (ms)")
    for disks in (1, 4):
        for dirty in (0, 16, 64, 256):
            with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
                windows = asyncio.run(_pause_series(Path(tmp), disks, dirty, args.pivots))
            stats = percentiles(windows)
            results.append({"disks": disks, "dirty_mib": dirty, **stats, "windows_ms": windows})
            print(f"{disks:>5} {dirty:>9} {stats['n']:>4} {stats['median']:>8} {stats['p95']:>8} "
                  f"{stats['p99']:>8} {stats['max']:>8}")
    save("pause", {"environment": environment(args.workdir), "results": results})
    _plot_pause(results)


def _plot_pause(results: list[dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['disks']}d/{r['dirty_mib']}M" for r in results]
    ax.boxplot([r["windows_ms"] for r in results], tick_labels=labels, showfliers=True)
    ax.set_ylabel("guest pause window (ms)")
    ax.set_xlabel("disks / MiB written just before the pivot")
    ax.set_title("blockcopy pivot pause window (QEMU STOP->RESUME)")
    fig.tight_layout()
    fig.savefig(RESULTS / "pause.png", dpi=100)
    print(f"wrote {RESULTS / 'pause.png'}")


# --- throughput --------------------------------------------------------------------------------


def _durable(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_source(workdir: Path, size_mib: int, sparse: bool) -> Path:
    raw = workdir / "random.raw"
    with open(raw, "wb") as out:
        for mib in range(size_mib):
            chunk = os.urandom(MIB) if not (sparse and mib % 2) else None
            if chunk is None:
                out.seek(MIB, os.SEEK_CUR)
            else:
                out.write(chunk)
        out.truncate(size_mib * MIB)
    source = workdir / "source.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(source)], check=True)
    raw.unlink()
    _durable(source)
    return source


def _time_blockcopy(workdir: Path, source: Path, dest: Path) -> float:
    async def run() -> float:
        vm = ScratchVM(workdir, [DiskSpec("vda", str(source))], name="tp", accel=pick_accel())
        manager = Manager(workdir / "state")
        try:
            await manager.attach("tp", str(vm.qmp_socket))
            started = time.perf_counter()
            request = CopyRequest("tp", [("vda", str(dest))], goal=Goal.FINISH)
            op = await manager.copy(request, until=Until.DONE)
            _durable(dest)
            elapsed = time.perf_counter() - started
            assert op.outcome is not None and op.outcome.value == "not-pivoted", op
            return elapsed
        finally:
            manager.close()
            vm.kill()

    return asyncio.run(run())


def _time_command(args: list[str], dest: Path) -> float:
    started = time.perf_counter()
    subprocess.run(args, check=True)
    _durable(dest)
    return time.perf_counter() - started


def _copy_methods(work: Path, source: Path) -> dict[str, Callable[[Path], float]]:
    return {
        "blockcopy": lambda dest: _time_blockcopy(work, source, dest),
        "qemu-img convert": lambda dest: _time_command(
            ["qemu-img", "convert", "-O", "qcow2", str(source), str(dest)], dest),
        "cp --sparse": lambda dest: _time_command(["cp", "--sparse=always", str(source), str(dest)], dest),
    }


def bench_throughput(args: argparse.Namespace) -> None:
    results = []
    cases = [(1024, False), (1024, True)] + ([] if args.quick else [(4096, False)])
    print(f"{'image':>18} {'method':>16} {'runs':>4} {'MiB/s median':>13} {'x qemu-img':>10} "
          f"{'MiB/s best':>11} {'x qemu-img':>10}")
    for size_mib, sparse in cases:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            work = Path(tmp)
            source = _make_source(work, size_mib, sparse)
            methods = _copy_methods(work, source)
            times: dict[str, list[float]] = {m: [] for m in methods}
            for rep in range(args.reps):
                for name, method in methods.items():  # alternating, so drift hits all alike
                    dest = work / f"dest-{rep}.qcow2"
                    times[name].append(method(dest))
                    dest.unlink()
                    os.sync()  # the next method starts with nothing of this one still being written
            label = f"{size_mib} MiB{' half-sparse' if sparse else ''}"
            baseline = size_mib / statistics.median(times["qemu-img convert"])
            best_baseline = size_mib / min(times["qemu-img convert"])
            for name, values in times.items():
                rate, best = size_mib / statistics.median(values), size_mib / min(values)
                results.append({"image": label, "method": name, "seconds": values, "mib_s": round(rate, 1),
                                "ratio_to_qemu_img": round(rate / baseline, 2), "best_mib_s": round(best, 1),
                                "best_ratio_to_qemu_img": round(best / best_baseline, 2)})
                print(f"{label:>18} {name:>16} {len(values):>4} {rate:>13.1f} {rate / baseline:>10.2f} "
                      f"{best:>11.1f} {best / best_baseline:>10.2f}")
    save("throughput", {"environment": environment(args.workdir), "results": results})


# --- copy modes under guest writes ---------------------------------------------------------------


def bench_modes(args: argparse.Namespace) -> None:
    """Time to ready and the guest's write latency, write-blocking vs background, guest writing."""
    from blockcopy.guest.session import GuestVM, pick_guest_accel

    accel = pick_guest_accel()
    size_mib, cap = 256, 64
    results = []
    print(f"guest on {accel}; {size_mib} MiB disk full of data, copy capped at {cap} MiB/s, "
          "guest writing 4 KiB O_DIRECT every 500 us")
    print(f"{'mode':>15} {'ready s':>8} {'lat p50 copying':>16} {'p99':>7} {'lat p50 ready':>14} {'p99':>7}  (us)")
    for rep in range(args.reps):
        for mode in ("write-blocking", "background"):
            with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
                work = Path(tmp)
                source = make_image(work / "source.qcow2", size_mib * MIB)
                subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5c 8M {size_mib - 8}M", str(source)],
                               check=True, capture_output=True)
                vm = GuestVM(work, [DiskSpec("vda", str(source))], accel=accel, interval_us=500)
                state = work / "state"
                try:
                    vm.acklog.wait_for(50)
                    subprocess.run(_bc(state, "attach", "m", "--qmp", str(vm.qmp_socket)), check=True,
                                   capture_output=True)
                    started = time.time()
                    proc = subprocess.run(_bc(state, "copy", "m", "vda", str(work / "d.qcow2"), "--mode", mode,
                                              "--bandwidth", str(cap), "--wait"), capture_output=True,
                                          timeout=120, check=False)
                    ready = time.time()
                    ok = proc.returncode == 0
                    time.sleep(2.0)
                    acks = list(vm.acklog.acks)
                finally:
                    vm.kill()
            copying = [a.latency_us for a in acks if started <= a.at <= ready and a.latency_us is not None]
            after = [a.latency_us for a in acks if ready < a.at and a.latency_us is not None]
            row = {"mode": mode, "rep": rep, "ready_s": round(ready - started, 2) if ok else None,
                   "latency_us_copying": percentiles([float(x) for x in copying]) if copying else None,
                   "latency_us_ready": percentiles([float(x) for x in after]) if after else None}
            results.append(row)
            c, r = row["latency_us_copying"] or {}, row["latency_us_ready"] or {}
            print(f"{mode:>15} {row['ready_s'] or 'timeout':>8} {c.get('median', '-'):>16} {c.get('p99', '-'):>7} "
                  f"{r.get('median', '-'):>14} {r.get('p99', '-'):>7}")
    save("modes", {"environment": {**environment(args.workdir), "guest_accel": accel}, "results": results})


# --- blockcopy's own cost ----------------------------------------------------------------------


def _bc(state: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "blockcopy", "--state-dir", str(state), *args]


def _attached_vms(work: Path, state: Path, prefix: str, count: int) -> list[ScratchVM]:
    """``count`` one-disk VMs (64 MiB, no guest OS) attached as domains PREFIX0, PREFIX1, ..."""
    vms: list[ScratchVM] = []
    try:
        for i in range(count):
            image = make_image(work / f"{prefix}{i}.qcow2", 64 * MIB)
            vms.append(ScratchVM(work, [DiskSpec("vda", str(image))], name=f"{prefix}{i}", accel="tcg",
                                 memory_mib=32))
            subprocess.run(_bc(state, "attach", f"{prefix}{i}", "--qmp", str(vms[-1].qmp_socket)), check=True,
                           capture_output=True)
    except BaseException:
        for vm in vms:
            vm.kill()
        raise
    return vms


def _run_measured(argvs: list[list[str]]) -> tuple[list[tuple[int, Any]], float]:
    """Run the commands at once; each one's (exit code, rusage) and the wall time until all ended."""
    started = time.perf_counter()
    procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL) for argv in argvs]
    runs = []
    for proc in procs:
        _pid, status, rusage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        runs.append((proc.returncode, rusage))
    return runs, time.perf_counter() - started


def bench_cost(args: argparse.Namespace) -> None:
    results: dict[str, Any] = {"concurrent": [], "recovery": []}
    counts = (1, 10) if args.quick else (1, 10, 30)
    print("one `blockcopy copy --pivot` process per job (CLI):")
    print(f"{'jobs':>5} {'CPU s/job':>10} {'CPU ms per s of copy':>21} {'peak RSS MiB':>13} {'wall s':>7}")
    for jobs in counts:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            work = Path(tmp)
            state = work / "state"
            vms = _attached_vms(work, state, "c", jobs)
            try:
                runs, wall = _run_measured([_bc(state, "copy", f"c{i}", "vda", str(work / f"d{i}.qcow2"),
                                                    "--pivot", "--bandwidth", "8") for i in range(jobs)])
            finally:
                for vm in vms:
                    vm.kill()
            cpu = [u.ru_utime + u.ru_stime for _code, u in runs]
            rss = max(u.ru_maxrss for _code, u in runs) / 1024
            row = {"jobs": jobs, "cpu_s_per_job": round(statistics.mean(cpu), 3),
                   "cpu_ms_per_copy_second": round(1000 * statistics.mean(cpu) / wall, 1),
                   "peak_rss_mib": round(rss, 1), "wall_s": round(wall, 1),
                   "failed": sum(code != 0 for code, _u in runs)}
            results["concurrent"].append(row)
            print(f"{jobs:>5} {row['cpu_s_per_job']:>10} {row['cpu_ms_per_copy_second']:>21} "
                  f"{row['peak_rss_mib']:>13} {row['wall_s']:>7}")
    print("one process (Manager API) driving all jobs concurrently, as a management app would:")
    print(f"{'jobs':>5} {'CPU s total':>12} {'CPU ms per s of copy':>21} {'peak RSS MiB':>13} {'wall s':>7}")
    for jobs in counts:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            work = Path(tmp)
            state = work / "state"
            vms = _attached_vms(work, state, "m", jobs)
            try:
                [(code, rusage)], wall = _run_measured([[
                    sys.executable, str(Path(__file__).with_name("many_jobs.py")), str(state),
                    *(f"m{i}={work / f'd{i}.qcow2'}" for i in range(jobs))]])
            finally:
                for vm in vms:
                    vm.kill()
            cpu = rusage.ru_utime + rusage.ru_stime
            row = {"jobs": jobs, "cpu_s_total": round(cpu, 3), "cpu_ms_per_copy_second": round(1000 * cpu / wall, 1),
                   "peak_rss_mib": round(rusage.ru_maxrss / 1024, 1), "wall_s": round(wall, 1),
                   "exit_status": code}
            results.setdefault("one_process", []).append(row)
            print(f"{jobs:>5} {row['cpu_s_total']:>12} {row['cpu_ms_per_copy_second']:>21} "
                  f"{row['peak_rss_mib']:>13} {row['wall_s']:>7}")
    print(f"{'unfinished jobs':>16} {'VMs':>4} {'recover s':>10}")
    for jobs in (1, 10, 100):
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            work = Path(tmp)
            state = work / "state"
            per_vm = min(jobs, 10)
            vms = []
            try:
                for v in range(jobs // per_vm):
                    specs = [DiskSpec(f"vd{chr(97 + i)}", str(make_image(work / f"v{v}d{i}.qcow2", 64 * MIB)))
                             for i in range(per_vm)]
                    vm = ScratchVM(work, specs, name=f"r{v}", accel="tcg", memory_mib=32)
                    vms.append(vm)
                    subprocess.run(_bc(state, "attach", f"r{v}", "--qmp", str(vm.qmp_socket)), check=True,
                                   capture_output=True)
                    for spec in specs:
                        subprocess.run(_bc(state, "copy", f"r{v}", spec.id, str(work / f"v{v}{spec.id}.dst"),
                                           "--bandwidth", "0.01"), check=True, capture_output=True)
                started = time.perf_counter()
                subprocess.run(_bc(state, "recover", "--no-wait"), check=True, capture_output=True)
                elapsed = time.perf_counter() - started
            finally:
                for vm in vms:
                    vm.kill()
            results["recovery"].append({"unfinished_jobs": jobs, "vms": len(vms), "recover_s": round(elapsed, 3)})
            print(f"{jobs:>16} {len(vms):>4} {elapsed:>10.3f}")
    save("cost", {"environment": {**environment(args.workdir), "accel": "tcg"}, **results})


# --- QMP round trip against command length ---------------------------------------------------------


def bench_qmp(args: argparse.Namespace) -> None:
    """A raw QMP socket (no client library), so that only QEMU's side is measured."""
    rounds = 50 if args.quick else 400
    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        vm = ScratchVM(work, [DiskSpec("vda", str(make_image(work / "a.qcow2", 64 * MIB)))], name="qmp",
                       accel=pick_accel())
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(vm.qmp_socket))
                stream = sock.makefile("rwb", buffering=0)
                stream.readline()  # greeting
                stream.write(json.dumps({"execute": "qmp_capabilities"}).encode() + b"\n")
                stream.readline()
                print(f"{'command bytes':>13} {'round trip median us':>21}")
                for pad in (0, 16, 64, 256, 1024):
                    line = json.dumps({"execute": "query-status", "id": "x" * pad}, separators=(",", ":")).encode()
                    times = []
                    for _ in range(rounds):
                        started = time.perf_counter()
                        stream.write(line + b"\n")
                        stream.readline()
                        times.append((time.perf_counter() - started) * 1e6)
                    median = statistics.median(times)
                    results.append({"bytes": len(line) + 1, "median_us": round(median, 1), "n": rounds})
                    print(f"{len(line) + 1:>13} {median:>21.0f}")
        finally:
            vm.kill()
    first, last = results[0], results[-1]
    per_byte = (last["median_us"] - first["median_us"]) / (last["bytes"] - first["bytes"])
    print(f"about {per_byte:.1f} us per command byte")
    save("qmp", {"environment": environment(args.workdir), "results": results, "us_per_byte": round(per_byte, 2)})


def bench_libvirt(args: argparse.Namespace) -> None:
    """bench/libvirt_rig.py, both modes (throughput and stall)."""
    import libvirt_rig  # beside this file; imported here because it installs and starts libvirt

    argv = ["all", "--workdir", str(args.workdir)] + (["--quick"] if args.quick else [])
    if args.reps_given:
        argv += ["--reps", str(args.reps_given)]
    libvirt_rig.main(argv)


def bench_plot(args: argparse.Namespace) -> None:
    """Redraw pause.png from the last pause.json."""
    _plot_pause(json.loads((RESULTS / "pause.json").read_text())["results"])


BENCHMARKS = {"pause": bench_pause, "throughput": bench_throughput, "modes": bench_modes, "cost": bench_cost,
              "qmp": bench_qmp}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, "plot", "libvirt", []],
                        help="benchmarks to run (default: all but libvirt); plot redraws pause.png from pause.json")
    parser.add_argument("--quick", action="store_true", help="smaller and fewer runs (a smoke test)")
    parser.add_argument("--pivots", type=int, default=50, help="pivots per pause series (default 50)")
    parser.add_argument("--reps", type=int, default=None,
                        help="repetitions per throughput method (default 5; libvirt: 7)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                        help="where images go (its file system is measured)")
    args = parser.parse_args()
    args.reps_given, args.reps = args.reps, args.reps or 5
    if args.quick:
        args.pivots = min(args.pivots, 10)
        args.reps = min(args.reps, 2)
    runners = {**BENCHMARKS, "plot": bench_plot, "libvirt": bench_libvirt}
    for name in args.names or list(BENCHMARKS):
        print(f"== {name}")
        runners[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
