"""How long a `blockcopy copy` takes from exec to the first QMP command it causes (issue 11).

    .venv/bin/python bench/startup.py [--reps N]

Not part of `make test`. The CLI is the worktree's, pip-installed into a venv of Debian's python3 as
users install it (``libvirt_rig.blockcopy_cli``). A scratch VM (KVM when it works, firmware only)
with a 64 MiB qcow2 disk is attached twice: to a state directory used without a daemon, and to
another one served by `blockcopy serve` (same install). Per rep, with the page cache dropped first
(cold) and then not (warm), `copy vm vda DEST` runs

  embedded   with --no-daemon: exec -> its own first QMP command (qmp_capabilities on its connection);
  daemon     through the daemon's socket: exec -> the daemon's first QMP command after the exec.
  floor      a floor for any command that talks QMP itself: the same venv's python imports only
             what a command cannot start without (``qemu.qmp``, hence asyncio; ``sqlite3`` for the
             journal), connects to the QMP socket and sends ``qmp_capabilities`` (FLOOR below; no
             event loop, no journal read): exec -> that, under strace as "embedded" is;
  floor-self the same program without strace, timed by itself (the wall time it prints just
             before it sends): what strace adds to the floor.

The sides run in a balanced order, one row of a Williams design per rep (libvirt_rig.rep_order).

QMP commands are seen with `strace --seccomp-bpf -f -ttt` on the sending process (the CLI started
under it, or the running daemon attached with -p), tracing only sendto/sendmsg/write (the other
syscalls run untraced; with -p, seccomp-bpf does not apply and every syscall of the daemon stops). exec
time is the wall clock just before the process is spawned. Each job is aborted after the rep.
Writes bench/results/startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from libvirt_rig import USER_VENV, blockcopy_cli, code_version, drop_caches, rep_order

from blockcopy.vm import DiskSpec, ScratchVM, make_image, pick_accel

RESULTS = Path(__file__).with_name("results")
#: the "floor" side's program: what every command must import, then one QMP command (argv[1]: the socket)
FLOOR = """
import socket, sqlite3, sys, time
import qemu.qmp
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.recv(65536)
print(repr(time.time()))
s.sendall(b'{"execute": "qmp_capabilities"}\\n')
s.recv(65536)
"""
SIDES = ("embedded", "daemon", "floor", "floor-self")
STRACE = ["strace", "--seccomp-bpf", "-f", "-ttt", "-e", "trace=sendto,sendmsg,write", "-s", "64"]


def first_qmp_command(trace: Path, after: float) -> float | None:
    """Wall time of the first QMP command (`"execute"` sent) in an strace log, after ``after``."""
    for line in trace.read_text(errors="replace").splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and "execute" in parts[2]:
            at = float(parts[1])
            if at >= after:
                return at
    return None


def run_cli(cli: list[str], *args: str, env: dict[str, str]) -> Any:
    proc = subprocess.run([*cli, *args, "--json"], env=env, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"blockcopy {' '.join(args)}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root (drop_caches)")
    cli = blockcopy_cli()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    results: dict[str, list[float]] = {f"{side} {temperature}": [] for side in SIDES
                                       for temperature in ("cold", "warm")}
    with tempfile.TemporaryDirectory(prefix="bc-startup-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        vm = ScratchVM(work, [DiskSpec("vda", str(make_image(work / "src.qcow2", 64 << 20)))], accel=pick_accel())
        embedded, served = work / "embedded", work / "served"
        daemon = subprocess.Popen([*cli, "serve", "--state-dir", str(served)], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
        tracer = subprocess.Popen([*STRACE, "-o", str(work / "daemon.trace"), "-p", str(daemon.pid)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not (served / "run" / "blockcopy.sock").exists():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    said = daemon.stderr.read().decode(errors="replace") if daemon.stderr else ""
                    raise RuntimeError(f"the daemon did not start: {said}")
                time.sleep(0.05)
            run_cli(cli, "attach", "vm", "--qmp", str(vm.qmp_socket), "--state-dir", str(embedded), "--no-daemon",
                    env=env)
            # QEMU serves one client per QMP socket: the daemon gets a VM of its own.
            vm2 = ScratchVM(work, [DiskSpec("vda", str(make_image(work / "src2.qcow2", 64 << 20)))], name="vm2",
                            accel=pick_accel())
            try:
                run_cli(cli, "attach", "vm2", "--qmp", str(vm2.qmp_socket), "--state-dir", str(served), env=env)
                for rep in range(args.reps):
                    for temperature in ("cold", "warm"):
                        for side in rep_order(list(SIDES), rep):
                            state = embedded if side == "embedded" else served
                            domain = "vm" if side == "embedded" else "vm2"
                            extra = ["--no-daemon"] if side == "embedded" else []
                            trace = work / f"{side}-{rep}-{temperature}.trace"
                            dest = work / f"{side}-{rep}-{temperature}.qcow2"
                            argv = [*cli, "copy", domain, "vda", str(dest), "--state-dir", str(state), "--json", *extra]
                            if side.startswith("floor"):
                                argv = [str(USER_VENV / "bin" / "python"), "-c", FLOOR, str(vm.qmp_socket)]
                            if side in ("embedded", "floor"):
                                argv = [*STRACE, "-o", str(trace), *argv]
                            if temperature == "cold":
                                drop_caches()
                            started = time.time()
                            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120,
                                                  check=False)
                            if proc.returncode != 0:
                                raise RuntimeError(f"copy ({side}): {proc.stderr.strip()}")
                            if side == "floor-self":
                                seen: float | None = float(proc.stdout.strip())
                            else:
                                seen = first_qmp_command(trace if side != "daemon" else work / "daemon.trace",
                                                         started)
                            if seen is None:
                                raise RuntimeError(f"no QMP command seen ({side})")
                            results[f"{side} {temperature}"].append(round((seen - started) * 1000, 1))
                            if not side.startswith("floor"):
                                run_cli(cli, "abort", json.loads(proc.stdout)["id"], "--state-dir", str(state),
                                        *extra, env=env)
                            dest.unlink(missing_ok=True)
                    print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]} ms" for k, v in results.items()), flush=True)
            finally:
                vm2.kill()
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
            tracer.wait(timeout=30)  # (it ends with the traced daemon)
            vm.kill()
    summary = {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)} for k, v in results.items()}
    for key, value in summary.items():
        print(f"{key:>14}: median {value['median_ms']} ms (min {value['min_ms']}, max {value['max_ms']})")
    RESULTS.mkdir(exist_ok=True)
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "accel": pick_accel(),
           "code": code_version(),
           "python": subprocess.run(["/usr/bin/python3", "--version"], capture_output=True, text=True).stdout.strip(),
           "method": "strace --seccomp-bpf on the CLI (embedded) or the daemon; exec = wall time before spawn",
           "runs_ms": results, "summary": summary}
    (RESULTS / "startup.json").write_text(json.dumps(out, indent=2, sort_keys=True))
    print(f"wrote {RESULTS / 'startup.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
