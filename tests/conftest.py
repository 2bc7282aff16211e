"""Fixtures: real QEMU VMs (no guest OS) and a runner for the ``blockcopy`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from blockcopy.vm import DiskSpec, ScratchVM, fill_pattern, image_has_pattern, make_image, pick_accel

MIB = 1024 * 1024
MARKER = 64 * 1024


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


def has_pattern(path: str | Path, pattern: int, offset: int, length: int = MARKER, fmt: str = "qcow2") -> bool:
    return image_has_pattern(str(path), fmt, pattern, offset, length)


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def qemu_jobs(vm: ScratchVM) -> list[dict[str, Any]]:
    return list(vm.cmd("query-jobs"))


def node_names(vm: ScratchVM) -> set[str]:
    return {n["node-name"] for n in vm.cmd("query-named-block-nodes", flat=True)}


#: (command, crash point, what happened to QEMU, outcome/authoritative) rows of the crash matrix.
MATRIX_RESULTS: list[tuple[str, str, str, str]] = []
#: (what the soak iteration did, outcome/authoritative) rows.
SOAK_RESULTS: list[tuple[str, str]] = []
#: Figures measured by the real-guest tests (printed, never asserted on).
GUEST_FIGURES: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for figure in GUEST_FIGURES:
        terminalreporter.write_line(f"guest: {figure}")
    for context, result in SOAK_RESULTS:
        terminalreporter.write_line(f"soak {context} -> {result}")
    if not MATRIX_RESULTS:
        return
    table: dict[tuple[str, str], dict[str, str]] = {}
    for command, point, after, result in MATRIX_RESULTS:
        table.setdefault((command, point), {})[after] = result
    write = terminalreporter.write_line
    write("")
    write("crash matrix: crash point x QEMU afterwards -> outcome/authoritative image after recover")
    write(f"{'command':<10} {'crash point':<24} {'QEMU alive':<24} {'QEMU killed':<24} {'QEMU quit':<24}")
    for (command, point), row in table.items():
        write(f"{command:<10} {point:<24} " + " ".join(f"{row.get(a, '-'):<24}" for a in ("alive", "kill", "quit")))
