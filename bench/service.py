"""Figures for the daemon (`blockcopy serve`): not pass/fail.

- API latency p50/p99 of `GET /v1/jobs` and `GET /v1/jobs/ID` while 30 jobs copy (one client,
  requests back to back over the unix socket);
- the daemon's CPU (share of one core) and RSS with N attached idle domains, then with 30 copying;
- event latency: QEMU's BLOCK_JOB_READY timestamp (read on each VM's second QMP socket) to the
  SSE client's receipt of the job's `ready` event, and the guest's pause window of each of those
  pivots (running guests), while 30 jobs copy and another client lists the jobs nonstop;
- recovery at start: the daemon killed (SIGKILL) with 100 unfinished jobs, restarted; exec to
  `GET /v1/health` answering.

Rig: scratch VMs (firmware only, KVM when it works, paused as they start so that their firmware
does not take the CPU), 64 MiB qcow2 disks with 4 MiB of data, the daemon from this checkout, its
client in this process. Writes bench/results/service.json.

usage: python bench/service.py [--domains 100] [--copying 30] [--events 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from service import EventLog, Served  # noqa: E402

from blockcopy.monitor import LeanQMPClient  # noqa: E402
from blockcopy.vm import DiskSpec, ScratchVM, fill_pattern, make_image, pick_accel  # noqa: E402

MIB = 1 << 20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def usage(pid: int, seconds: float) -> dict[str, float]:
    """CPU share of one core over ``seconds``, and RSS at the end."""
    def ticks() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    hz = os.sysconf("SC_CLK_TCK")
    before, t0 = ticks(), time.monotonic()
    time.sleep(seconds)
    cpu = (ticks() - before) / hz / (time.monotonic() - t0)
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return {"cpu_share": round(cpu, 4), "rss_mib": round(rss / 1024, 1)}


class ReadyWatch:
    """BLOCK_JOB_READY timestamps of one VM, from its aux QMP socket."""

    def __init__(self, vm: ScratchVM) -> None:
        self.times: dict[str, float] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(str(vm.aux_socket)), self._loop).result(30)

    async def _start(self, path: str) -> None:
        for _ in range(100):  # QEMU listens again a moment after its previous client left
            self.client = LeanQMPClient("bench-events")
            try:
                await self.client.connect(path)
                break
            except Exception:
                await asyncio.sleep(0.05)
        self._task = asyncio.ensure_future(self._listen())

    async def _listen(self) -> None:
        async for event in self.client.events:
            if event["event"] == "BLOCK_JOB_READY":
                stamp = event["timestamp"]
                self.times[event["data"]["device"]] = stamp["seconds"] + stamp["microseconds"] / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", type=int, default=100)
    parser.add_argument("--copying", type=int, default=30)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "service.json"))
    args = parser.parse_args()
    assert args.domains >= args.copying + args.events
    work = Path(tempfile.mkdtemp(prefix="bc-bench-service-"))
    accel = pick_accel()
    results: dict[str, Any] = {"rig": f"scratch VMs ({accel}, paused), {os.cpu_count()} cores, 64 MiB qcow2 disks "
                               "with 4 MiB of data; daemon from this checkout",
                               "when": time.strftime("%Y-%m-%d %H:%M")}

    def start_vm(i: int) -> ScratchVM:
        image = make_image(work / f"d{i}.qcow2", 64 * MIB)
        fill_pattern(image, "qcow2", 0x11, 0, 4 * MIB)
        vm = ScratchVM(work, [DiskSpec("vda", str(image))], name=f"vm{i}", accel=accel, memory_mib=32)
        vm.cmd("stop")  # the firmware's boot would take seconds of CPU per VM: these figures are the daemon's
        return vm

    with ThreadPoolExecutor(8) as pool:
        vms = list(pool.map(start_vm, range(args.domains)))
    daemon = Served(work / "state")
    try:
        daemon.start()
        assert daemon.proc is not None
        for i, vm in enumerate(vms):
            daemon.ok("POST", "/v1/domains", {"name": f"vm{i}", "qmp_socket": str(vm.qmp_socket)})
        results["idle"] = {"domains": args.domains, **usage(daemon.proc.pid, 10.0)}
        print("idle", results["idle"], flush=True)

        def copy(i: int, suffix: str = "", **extra: Any) -> dict[str, Any]:
            dest = str(work / f"dst{i}{suffix}.qcow2")
            body = {"domain": f"vm{i}", "disks": [{"disk": "vda", "destination": dest}], **extra}
            return dict(daemon.ok("POST", "/v1/jobs", body))

        started = time.monotonic()
        jobs = [copy(i, bandwidth_mib=0.05) for i in range(args.copying)]
        results["create_job_s_each"] = round((time.monotonic() - started) / args.copying, 4)
        results["copying"] = {"jobs": args.copying, **usage(daemon.proc.pid, 10.0)}
        print("copying", results["copying"], flush=True)
        for name, path in (("jobs", "/v1/jobs"), ("status", f"/v1/jobs/{jobs[0]['id']}")):
            times = []
            for _ in range(args.requests):
                t0 = time.perf_counter()
                daemon.ok("GET", path)
                times.append((time.perf_counter() - t0) * 1000)
            results[f"latency_{name}_ms"] = {"p50": round(percentile(times, 0.5), 3),
                                             "p99": round(percentile(times, 0.99), 3), "n": len(times)}
            print(name, results[f"latency_{name}_ms"], flush=True)

        # Event latency and pause windows: unthrottled copies with pivot on other VMs (running
        # guests), one at a time, while the 30 jobs copy and another client lists jobs nonstop.
        for i in range(args.copying, args.copying + args.events):
            vms[i].cmd("cont")
        time.sleep(6)  # their firmware's boot, which takes the CPU for a few seconds
        stop = threading.Event()

        def lister() -> None:
            while not stop.wait(0.01):
                daemon.ok("GET", "/v1/jobs")

        background = threading.Thread(target=lister)
        background.start()
        log = EventLog(daemon)
        log.events = []
        log.start()
        latencies, pauses = [], []
        for i in range(args.copying, args.copying + args.events):
            vms[i]._close_aux()  # (QEMU serves one client per socket: the watch takes the aux one)
            watch = ReadyWatch(vms[i])
            seen = len(log.events)
            job = copy(i, goal="pivot")

            def arrived(kind: str, job_id: str = job["id"], seen: int = seen) -> bool:
                return any(k == kind and data["job"] == job_id for _s, k, data in log.events[seen:])

            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not arrived("ready"):
                time.sleep(0.0005)
            received = time.time()
            qemu = watch.times.get(job["disks"][0]["job_id"])
            if qemu is not None:
                latencies.append((received - qemu) * 1000)
            while time.monotonic() < deadline and not arrived("outcome"):
                time.sleep(0.005)
            ended = daemon.ok("GET", f"/v1/jobs/{job['id']}")
            if ended["pause_window_ms"] is not None:
                pauses.append(ended["pause_window_ms"])
        stop.set()
        background.join()
        log.stop()
        results["ready_event_latency_ms"] = {"median": round(statistics.median(latencies), 2),
                                             "p90": round(percentile(latencies, 0.9), 2),
                                             "max": round(max(latencies), 2), "n": len(latencies),
                                             "all": [round(x, 2) for x in latencies]}
        results["pivot_pause_ms_under_load"] = {"median": round(statistics.median(pauses), 2),
                                                "max": round(max(pauses), 2), "n": len(pauses),
                                                "all": [round(x, 2) for x in pauses]}
        print("ready latency", results["ready_event_latency_ms"], flush=True)
        print("pauses", results["pivot_pause_ms_under_load"], flush=True)

        # Recovery at start with 100 unfinished jobs.
        for i in range(args.copying, min(args.domains, 100)):
            copy(i, "-r", bandwidth_mib=0.05)
        unfinished = sum(1 for j in daemon.ok("GET", "/v1/jobs") if j["outcome"] is None)
        daemon.kill9()
        t0 = time.monotonic()
        daemon.start(timeout=600)
        results["recovery_at_start"] = {"unfinished_jobs": unfinished,
                                        "exec_to_serving_s": round(time.monotonic() - t0, 3)}
        print("recovery", results["recovery_at_start"], flush=True)
        for job in daemon.ok("GET", "/v1/jobs"):
            if job["outcome"] is None:
                daemon.call("POST", f"/v1/jobs/{job['id']}/abort")
        daemon.stop()
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill9()
        for vm in vms:
            vm.kill()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    Path(args.out).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
