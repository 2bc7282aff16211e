"""Fixtures: real QEMU VMs (no guest OS) and a runner for the ``blockcopy`` command."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from blockcopy.vm import AuxMonitor, DiskSpec, ScratchVM, fill_pattern, image_has_pattern, make_image, pick_accel

MIB = 1024 * 1024
MARKER = 64 * 1024

# The suite runs the `blockcopy` command thousands of times in subprocesses. With
# PYTHONDONTWRITEBYTECODE set (some development machines set it), each one would compile every
# module it imports again, which no user's install does (pip writes bytecode): the crash matrix
# ran 15-20% slower here. The subprocesses inherit this.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)


class Blockcopy:
    """Runs the real ``blockcopy`` command in a subprocess against a private state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.env = {**os.environ, "BLOCKCOPY_STATE_DIR": str(state_dir)}
        self.env.pop("BLOCKCOPY_CRASH_AT", None)

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "blockcopy", *args]

    def __call__(self, *args: str, crash_at: str | None = None, timeout: float = 120.0) -> Result:
        env = dict(self.env)
        if crash_at:
            env["BLOCKCOPY_CRASH_AT"] = crash_at
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True, env=env, timeout=timeout,
                              check=False)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def ok(self, *args: str, **kwargs: Any) -> Result:
        result = self(*args, **kwargs)
        assert result.returncode == 0, f"blockcopy {' '.join(args)} failed: {result.stderr}{result.stdout}"
        return result

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env)


@pytest.fixture
def bc(tmp_path: Path) -> Blockcopy:
    return Blockcopy(tmp_path / "state")


@pytest.fixture(scope="session")
def accel() -> str:
    return pick_accel()


VMFactory = Callable[..., ScratchVM]


@pytest.fixture
def vm_factory(tmp_path: Path, accel: str) -> Iterator[VMFactory]:
    vms: list[ScratchVM] = []

    def start(disks: int | list[DiskSpec] = 1, *, size: int = 64 * MIB, name: str = "vm",
              fill: bool = True) -> ScratchVM:
        if isinstance(disks, int):
            specs = []
            for i in range(disks):
                path = make_image(tmp_path / f"{name}-disk{i}.qcow2", size)
                if fill:
                    fill_pattern(path, "qcow2", 0x11 + i, 0, 4 * MIB)
                specs.append(DiskSpec(f"vd{chr(ord('a') + i)}", str(path)))
            disks = specs
        vm = ScratchVM(tmp_path, disks, name=name, accel=accel)
        vms.append(vm)
        return vm

    yield start
    for vm in vms:
        vm.kill()


@pytest.fixture
def attached(vm_factory: VMFactory, bc: Blockcopy) -> Callable[..., ScratchVM]:
    """A VM that is already attached to blockcopy as domain 'vm'."""

    def start(*args: Any, **kwargs: Any) -> ScratchVM:
        vm = vm_factory(*args, **kwargs)
        bc.ok("attach", kwargs.get("name", "vm"), "--qmp", str(vm.qmp_socket))
        return vm

    return start


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount small tmpfs file systems (a real ENOSPC, a read-only directory); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str, *, readonly: bool = False) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        options = f"size={size}" + (",ro" if readonly else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


@dataclass
class ServedFile:
    """A regular file served by qemu-storage-daemon's FUSE export, for storage that misbehaves:
    SIGSTOP the daemon and every I/O on the file hangs (a dead NFS server, a stuck array); or
    throttle its writes at run time (a slow or overloaded disk)."""

    path: Path
    daemon: subprocess.Popen[bytes]
    qmp: Path

    def hang(self) -> None:
        self.daemon.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.daemon.send_signal(signal.SIGCONT)

    def throttle(self, write_bytes_per_second: int) -> None:
        monitor = AuxMonitor(str(self.qmp))
        try:
            monitor.cmd("qom-set", {"path": "tg", "property": "limits",
                                    "value": {"bps-write": write_bytes_per_second}})
        finally:
            monitor.close()


@pytest.fixture
def served_file(tmp_path: Path) -> Iterator[Callable[[int], ServedFile]]:
    made: list[ServedFile] = []

    def make(size: int) -> ServedFile:
        n = len(made)
        backing = tmp_path / f"served{n}-backing.raw"
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(backing), str(size)], check=True)
        mountpoint, qmp = tmp_path / f"served{n}.raw", tmp_path / f"served{n}.qmp"
        mountpoint.touch()
        daemon = subprocess.Popen(
            ["qemu-storage-daemon", "--object", "throttle-group,id=tg",
             "--blockdev", f"driver=file,filename={backing},node-name=f",
             "--blockdev", "driver=throttle,throttle-group=tg,file=f,node-name=t",
             "--export", f"type=fuse,id=e,node-name=t,mountpoint={mountpoint},writable=on",
             "--chardev", f"socket,id=m,path={qmp},server=on,wait=off", "--monitor", "chardev=m"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        made.append(ServedFile(mountpoint, daemon, qmp))
        wait_for(lambda: mountpoint.stat().st_size == size and qmp.exists(), timeout=30, what="the FUSE export")
        return made[-1]

    yield make
    for item in made:
        item.resume()
        item.daemon.terminate()
        try:
            item.daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            item.daemon.kill()
            item.daemon.wait(timeout=30)
        subprocess.run(["umount", "-l", str(item.path)], capture_output=True, check=False)


def has_pattern(path: str | Path, pattern: int, offset: int, length: int = MARKER, fmt: str = "qcow2") -> bool:
    return image_has_pattern(str(path), fmt, pattern, offset, length)


def guest_reads(vm: ScratchVM, disk: str, pattern: int, offset: int, length: int = MARKER) -> bool:
    """True when the *guest* reads ``pattern`` at ``offset`` of ``disk``: through QEMU (an NBD export
    of the device's root node), not from image files, so a node opened without its backing chain
    reads as it would to the guest."""
    node, _file = vm.device_node(disk)
    sock = Path(vm.workdir) / f"{vm.name}-{disk}-nbd.sock"
    vm.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    try:
        vm.cmd("block-export-add", type="nbd", id="bc-test-read", **{"node-name": node}, name="r", writable=False)
        try:
            proc = subprocess.run(["qemu-io", "-r", "-f", "raw", f"nbd+unix:///r?socket={sock}",
                                   "-c", f"read -P {pattern:#x} {offset} {length}"],
                                  capture_output=True, text=True, timeout=60, check=False)
        finally:
            vm.cmd("block-export-del", id="bc-test-read")
    finally:
        vm.cmd("nbd-server-stop")
    return proc.returncode == 0 and "Pattern verification failed" not in proc.stdout and "read " in proc.stdout


def process_state(pid: int) -> str:
    """One-letter state of a process from /proc ('T' when stopped by a signal)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rfind(")") + 2:].split()[0]


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def interrupt_wait(proc: subprocess.Popen[str]) -> str:
    """Ctrl-C to a blockcopy command that waits: it must stop waiting (exit 130) and say the job
    keeps running. Returns its stderr; the process is killed should it not end."""
    try:
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "keeps running" in err, err
    return str(err)


@contextmanager
def migration_that_runs(vm: ScratchVM, workdir: Path) -> Iterator[None]:
    """A migration of ``vm`` that stays active until the block ends, then is cancelled.

    Two things keep it from ever completing, whatever the host's socket buffers: the stream goes
    to a unix socket nobody reads, and it is throttled to QEMU 7.2's smallest real rate (10 B/s:
    QEMU allows max-bandwidth/10 bytes per 100 ms, and 0 would mean no limit), so its first pass
    over the guest's RAM would take half an hour. Without the throttle the stream (about 0.25 MB
    for a 64 MiB guest, mostly zero pages) can fit in a large socket buffer: QEMU then enters
    the migration's completion with the big QEMU lock held, blocks writing the device state, and
    the monitor hangs (a CI run on a fresh machine saw `migrate_cancel` time out that way)."""
    vm.cmd("migrate-set-parameters", **{"max-bandwidth": 10})
    stuck = socket.socket(socket.AF_UNIX)
    stuck.bind(str(workdir / "migration.sock"))
    stuck.listen(1)  # (the kernel takes the connection; nobody ever reads it)
    try:
        vm.cmd("migrate", uri=f"unix:{workdir / 'migration.sock'}")
        try:
            wait_for(lambda: vm.cmd("query-migrate")["status"] == "active", what="the migration to run")
            yield
        finally:
            vm.cmd("migrate_cancel")
    finally:
        stuck.close()


def qemu_jobs(vm: ScratchVM) -> list[dict[str, Any]]:
    return list(vm.cmd("query-jobs"))


def node_names(vm: ScratchVM) -> set[str]:
    return {n["node-name"] for n in vm.cmd("query-named-block-nodes", flat=True)}


Report = Callable[[str, Any], None]


@pytest.fixture
def report(record_property: Callable[[str, Any], None]) -> Report:
    """Record a figure or result row for the summary at the end of the run: ``report("matrix",
    (command, point, after, result))``, ``report("soak", (context, result))``, ``report("guest",
    text)``. Carried on the test's report, so it reaches the summary from pytest-xdist workers too.
    Printed, never asserted on."""
    return record_property


def _reported(terminalreporter: Any, kind: str) -> list[Any]:
    found = []
    for reports in terminalreporter.stats.values():
        for rep in reports:
            if getattr(rep, "when", None) == "call":
                found.extend(value for name, value in getattr(rep, "user_properties", ()) if name == kind)
    return found


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for figure in _reported(terminalreporter, "guest"):
        terminalreporter.write_line(f"guest: {figure}")
    for context, result in _reported(terminalreporter, "soak"):
        terminalreporter.write_line(f"soak {context} -> {result}")
    rows = _reported(terminalreporter, "matrix")
    if not rows:
        return
    table: dict[tuple[str, str], dict[str, str]] = {}
    for command, point, after, result in sorted(rows, key=lambda r: (r[0], _POINT_ORDER.get((r[0], r[1]), 0))):
        table.setdefault((command, point), {})[after] = result
    write = terminalreporter.write_line
    write("")
    write("crash matrix: crash point x QEMU afterwards -> outcome/authoritative image after recover")
    write(f"{'command':<10} {'crash point':<24} {'QEMU alive':<24} {'QEMU killed':<24} {'QEMU quit':<24}")
    for (command, point), row in table.items():
        write(f"{command:<10} {point:<24} " + " ".join(f"{row.get(a, '-'):<24}" for a in ("alive", "kill", "quit")))


def _point_order() -> dict[tuple[str, str], int]:
    from crashpoints import POINTS

    return {(f"{command} {disks}d", point): i for (command, disks), points in POINTS.items()
            for i, point in enumerate(points)}


_POINT_ORDER = _point_order()
