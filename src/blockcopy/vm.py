"""Scratch QEMU VMs for the demo, the tests and the benchmarks.

A scratch VM has virtio disks defined with ``-blockdev`` (as libvirt does), one QMP socket for
blockcopy and a second one ("aux") for the test or demo harness, which injects guest-like writes
through the device with HMP ``qemu-io -d <id>/virtio-backend "aio_write ..."``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockcopy.monitor import FDSET_OPAQUE_PREFIX, LeanQMPClient, devices_from_query_block

QEMU = "qemu-system-x86_64"


@dataclass(frozen=True)
class DiskSpec:
    id: str  # qdev id, e.g. "vda"; nodes are "<id>-file" and "<id>-fmt"
    path: str
    format: str = "qcow2"


class AuxMonitor:
    """A synchronous QMP client (qemu.qmp in a private event-loop thread) for test and demo harnesses.

    Usable from plain code, from threads and from inside another running event loop alike.
    """

    def __init__(self, socket_path: str, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="aux-qmp")
        self._thread.start()
        self._client = LeanQMPClient("blockcopy-aux")
        self._call(self._client.connect(socket_path))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.timeout)

    def cmd(self, command: str, args: dict[str, Any] | None = None) -> Any:
        return self._call(self._client.execute(command, args))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._client.disconnect())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@functools.cache
def pick_accel(deadline: float = 5.0) -> str:
    """'kvm' if a KVM VM starts, answers QMP and quits within ``deadline`` seconds, else 'tcg'.

    On some hosts /dev/kvm exists but KVM is unusable (nested virtualisation), so probe it.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or shutil.which(QEMU) is None:
        return "tcg"
    args = [QEMU, "-accel", "kvm", "-machine", "q35", "-nodefaults", "-display", "none", "-m", "32",
            "-S", "-qmp", "stdio"]
    commands = b'{"execute":"qmp_capabilities"}\n{"execute":"cont"}\n{"execute":"query-kvm"}\n' \
               b'{"execute":"quit"}\n'
    try:
        proc = subprocess.run(args, input=commands, capture_output=True, timeout=deadline, check=False)
    except subprocess.TimeoutExpired:
        return "tcg"
    ok = proc.returncode == 0 and b'"enabled": true' in proc.stdout
    return "kvm" if ok else "tcg"


#: A minimal firmware (Debian's qemu-system-data ships it): with nothing to boot it halts. The
#: default SeaBIOS keeps a core busy looking for a boot device, and the tests start hundreds of VMs.
QBOOT = "/usr/share/qemu/qboot.rom"


def _quiet_firmware() -> list[str]:
    return ["-bios", QBOOT] if os.path.exists(QBOOT) else []


class ScratchVM:
    """A QEMU process with virtio disks and no guest OS (the firmware idles)."""

    def __init__(self, workdir: Path, disks: list[DiskSpec], *, name: str = "vm", accel: str = "tcg",
                 memory_mib: int = 64, extra_args: list[str] | None = None) -> None:
        self.workdir = workdir
        self.disks = disks
        self.name = name
        self.accel = accel
        self.qmp_socket = workdir / f"{name}.qmp"
        self.aux_socket = workdir / f"{name}.aux.qmp"
        self.log_path = workdir / f"{name}.log"
        args = [QEMU, "-name", name, "-nodefaults", "-no-user-config", "-display", "none",
                "-machine", f"q35,accel={accel}", "-m", str(memory_mib), *_quiet_firmware(),
                "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
                "-qmp", f"unix:{self.aux_socket},server=on,wait=off"]
        for disk in disks:
            args += ["-blockdev", f"driver=file,filename={disk.path},node-name={disk.id}-file",
                     "-blockdev", f"driver={disk.format},file={disk.id}-file,node-name={disk.id}-fmt",
                     "-device", f"virtio-blk-pci,drive={disk.id}-fmt,id={disk.id}"]
        args += extra_args or []
        self.args = args
        for stale in (self.qmp_socket, self.aux_socket):  # left by an earlier VM of the same name
            stale.unlink(missing_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self._aux: AuxMonitor | None = None
        self._aux_lock = threading.Lock()
        self._wait_for_sockets()

    def _wait_for_sockets(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not (self.qmp_socket.exists() and self.aux_socket.exists()):
            if self.process.poll() is not None:
                raise RuntimeError(f"QEMU exited: {self.log_path.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise RuntimeError("QEMU did not create its QMP sockets in time")
            time.sleep(0.02)

    @property
    def aux(self) -> AuxMonitor:
        with self._aux_lock:
            deadline = time.monotonic() + 10
            while self._aux is None:
                try:
                    self._aux = AuxMonitor(str(self.aux_socket))
                except Exception:  # the socket file exists a moment before QEMU listens on it
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise
                    time.sleep(0.05)
            return self._aux

    def cmd(self, command: str, **args: Any) -> Any:
        """Run a QMP command on the aux monitor; raises qemu.qmp's ExecuteError on error."""
        return self.aux.cmd(command, args or None)

    def hmp(self, line: str) -> str:
        return str(self.cmd("human-monitor-command", **{"command-line": line}))

    def qemu_io(self, disk: str, line: str) -> str:
        """A guest-like I/O through the device's BlockBackend (never a synchronous write: see README)."""
        escaped = line.replace('"', '\\"')
        return self.hmp(f'qemu-io -d {disk}/virtio-backend "{escaped}"')

    def write_marker(self, disk: str, pattern: int, offset: int, length: int = 65536) -> None:
        """Write ``pattern`` bytes through the device and wait until the write is acknowledged."""
        out = self.qemu_io(disk, f"aio_write -P {pattern:#x} {offset} {length}")
        out += self.qemu_io(disk, "aio_flush")  # waits for the write: it is acknowledged now
        # A real flush, so that another process reading the image file sees the write (qcow2 metadata
        # lives in QEMU's cache until then), as a guest's fsync would.
        out += self.qemu_io(disk, "flush")
        if "error" in out.lower() or "failed" in out.lower():
            raise RuntimeError(f"marker write failed: {out}")

    def run_state(self) -> str:
        return str(self.cmd("query-status")["status"])

    def device_node(self, disk: str) -> tuple[str, str]:
        """(node name, file) that the device ``disk`` uses now; a file QEMU opened from one of
        blockcopy's fd sets is named by the path blockcopy passed in."""
        for device in devices_from_query_block(self.cmd("query-block"), self.blockcopy_fdsets()):
            if device.qdev_id == disk:
                return device.node, device.file
        raise KeyError(disk)

    def blockcopy_fdsets(self) -> dict[int, str]:
        return {int(s["fdset-id"]): str(fd["opaque"]).removeprefix(FDSET_OPAQUE_PREFIX)
                for s in self.cmd("query-fdsets") for fd in s.get("fds", [])
                if str(fd.get("opaque") or "").startswith(FDSET_OPAQUE_PREFIX)}

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self._close_aux()

    def quit(self) -> None:
        if self.alive():
            with contextlib.suppress(Exception):
                self.cmd("quit")
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._close_aux()

    def _close_aux(self) -> None:
        if self._aux is not None:
            with contextlib.suppress(Exception):
                self._aux.close()
            self._aux = None


def make_image(path: Path, size: int, fmt: str = "qcow2", backing: Path | None = None) -> Path:
    args = ["qemu-img", "create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run([*args, str(path), str(size)], check=True)
    return path


def fill_pattern(path: Path, fmt: str, pattern: int, offset: int, length: int) -> None:
    """Write a pattern into an image that no QEMU holds (test and demo set-up)."""
    subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -P {pattern:#x} {offset} {length}", str(path)],
                   check=True, capture_output=True)


def image_has_pattern(path: str, fmt: str, pattern: int, offset: int, length: int) -> bool:
    """True when the guest-visible bytes at offset hold ``pattern``; reads without locks."""
    from blockcopy.images import image_opts

    proc = subprocess.run(["qemu-io", "-r", "--image-opts", image_opts(path, fmt),
                           "-c", f"read -P {pattern:#x} {offset} {length}"],
                          capture_output=True, text=True, check=False)
    return proc.returncode == 0 and "Pattern verification failed" not in proc.stdout \
        and "read " in proc.stdout
