"""blockcopy vs libvirt's `virsh blockcopy` on libvirt's own rig, in one run, interleaved (issue 11).

    .venv/bin/python bench/libvirt_rig.py [throughput|stall|all] [--reps N] [--quick] [--alt-buf SIZE...]
        [--daemon-buf SIZE|default...] [--stall-alt-buf SIZE...] [--page-cache-fill] [--section NAME]
        [--workdir DIR]

Not part of `make test`: it installs Debian's libvirt if missing (apt-get), starts libvirtd itself
(no systemd here) in a private mount namespace whose /etc/libvirt/qemu.conf is this benchmark's own
(QEMU runs as root, as the standalone QEMU does, since /dev/kvm is root-only here; serial output to
plain files), and stops it at the end. Nothing under /etc is changed.

The rig: a *transient* libvirt domain (`virsh create`) with a `cache='none'` qcow2 virtio disk on
machine pc-i440fx, no guest OS (throughput) or the project's writer guest (stall). The QEMU command
line that libvirt runs (/proc/PID/cmdline) is the rig: blockcopy's VM is a standalone QEMU started
with that same command line, less what belongs to libvirt (its monitor chardev and -mon, the
master-key secret object, -sandbox, -S), pointed at its own copy of the same source image, plus
`-qmp` for blockcopy. Both VMs get the same extra, passive QMP monitor (for libvirt through
`<qemu:commandline>`), on which this script only listens to QEMU's events: job created / READY /
STOP / RESUME with QEMU's own timestamps, read the same way for both tools.

throughput: per rep, in a balanced order (rep_order: a Williams design), each tool after
`sync; echo 3 > drop_caches`:
  libvirt     virsh blockcopy DOM vda DEST --wait --pivot --transient-job; sync -f DEST
              (libvirt creates DEST itself, as users run it: blockdev-create, format = the source's)
  qemu-img    qemu-img convert -O qcow2 SRC DEST; sync -f DEST
  cp          cp --sparse=always SRC DEST; sync -f DEST
  blockcopy   blockcopy copy DOM virtio-disk0 DEST --pivot; sync -f DEST (the worktree's CLI, its own
              --state-dir, `attach` done before and not timed; it creates DEST itself)
  blockcopy-SIZE  the same with --buf-size SIZE, for each --alt-buf (default 16M, QEMU's and
                 libvirt's buffer, and 1M): what the default buffer trades
  blockcopy-pcf  with --page-cache-fill (the option's column, throughput and stall): DEST filled
                 through the page cache, reopened O_DIRECT once ready (the default until 2026-11-27)
  blockcopy-daemon[-SIZE]  for each --daemon-buf (default none; "default" for the default buffer):
              the same command through `blockcopy serve` (a daemon of the same install, started
              with the VM and attached through it before the page cache is dropped, as a resident
              service is; the command's .pyc files are cold, the interpreter the daemon keeps
              mapped is not): what a CLI user pays per job with the service running (an app that
              speaks HTTP to the daemon does not pay the CLI's start). Both journal progress every
              2 s (the daemon every 1 s before 783e772). Unless the reps are a multiple of the
              design's rows (the number of tools, twice that when it is odd) the balance is partial.
  timed end to end (command start -> sync done); mirror phase = job created -> BLOCK_JOB_READY from
  QEMU's event times; every DEST checked equal to the source with `qemu-img compare` afterwards.
  Each VM is first left until QEMU is idle (wait_until_idle: the firmware spins a vCPU for ~5 s
  after start when there is nothing to boot; a copy timed then shares this 2-core machine with it).

stall: the writer guest (TCG unless it boots under KVM) copied and pivoted by libvirt and by
blockcopy (and by blockcopy with --buf-size SIZE for each --stall-alt-buf), alternating; stall = the
largest gap between consecutive host-stamped guest acknowledgements that overlaps the pivot window
(libvirt: its first pivot-related QMP command (a bitmap `transaction`, then `job-complete`) to its
last cleanup reply (`blockdev-del`), from libvirtd's debug log, millisecond stamps; blockcopy:
QEMU's STOP event to the journaled end in `status --log`, which follows the reply of its last
cleanup command, so a bound from above; the JSON also has blockcopy's stall up to QEMU's job-dismiss
event, a bound from below); also the largest gap while copying (job created -> READY) and in the
last second before READY. Same gap code (AckLog.max_gap) for both. Every acknowledged write is
checked on DEST afterwards (VM paused). With --stall-floor, two more sides measure the floor of any
pivot that pauses the guest, on the same VM: blockcopy copies and is killed right after it journals
PIVOTING, then this script pivots with QEMU's least command sequence on blockcopy's socket, from
one thread, commands that need not wait sent back to back (``bare-pause``: stop + job-complete,
wait for pending, job-finalize + cont, job-dismiss), and the same with two fsynced SQLite commits
where blockcopy makes its two (``bare-pause+journal``: ... pending, commit, job-finalize, commit,
cont); see bare_pivot. Their window is QEMU's STOP to the job-dismiss reply; their "seconds" are not timed (0).

libvirtd logs its monitor traffic (log_filters 1:qemu.qemu_monitor) in both modes: that is where
its pivot window comes from. Writes bench/results/libvirt.json (one section per mode, `_quick` for
--quick, or the --section given), with the commit of the worktree it installed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import functools
import json
import os
import platform
import queue
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockcopy.vm import pick_accel

MIB = 1024 * 1024
RESULTS = Path(__file__).with_name("results")
URI = "qemu:///system"
DOMAIN = "bcbench"
DISK_TARGET = "vda"  # libvirt's name for the disk
QDEV = "virtio-disk0"  # the qdev id libvirt gives it, which blockcopy uses (no "vda" on this command line)
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
LIBVIRTD = "/usr/sbin/libvirtd"
GUEST_MIB = 256


USER_VENV = Path("/var/tmp/blockcopy-bench-venv")


@functools.cache
def blockcopy_cli() -> list[str]:
    """The worktree's CLI installed as a user installs it: ``pip install`` into a venv of Debian's
    python3, bytecode compiled at install. Not the development venv: there the interpreter may lack
    the standard library's bytecode and PYTHONDONTWRITEBYTECODE may be set, and every command would
    compile its imports first (70-100 ms here), which no user pays."""
    python = USER_VENV / "bin" / "python"
    if not python.exists():
        run(["/usr/bin/python3", "-m", "venv", str(USER_VENV)])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    run([str(python), "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", str(Path(__file__).parents[1])],
        env=env)
    run([str(python), "-m", "pip", "install", "-q", str(Path(__file__).parents[1])], env=env)  # its dependencies
    return [str(USER_VENV / "bin" / "blockcopy")]


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("check", True)
    kwargs.setdefault("capture_output", True)
    return subprocess.run(args, text=True, **kwargs)


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["virsh", "-c", URI, *args], check=check)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def sync_file(path: Path) -> None:
    run(["sync", "-f", str(path)])


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def wait_for_path(path: Path, timeout: float = 30.0, alive: Callable[[], bool] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if alive is not None and not alive():
            raise RuntimeError(f"process exited before creating {path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear in {timeout} s")
        time.sleep(0.01)


def connect_unix(path: Path, timeout: float = 30.0) -> socket.socket:
    """A connected AF_UNIX socket to ``path``, retried while it refuses: a QMP socket file exists
    from QEMU's bind(), connections work from its listen(), and a monitor whose client was just
    killed is free again only on QEMU's next loop."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(str(path))
            return sock
        except ConnectionRefusedError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def wait_until_idle(pid: int, timeout: float = 30.0) -> float:
    """Wait until QEMU ``pid`` used less than a tenth of a core in each of two consecutive 0.5 s
    windows; the seconds waited.

    A VM with no guest OS spins a vCPU at 100% for its first ~5 s here (the firmware looking for
    something to boot) and then halts. A copy timed during that spin runs on one core of this
    machine's two, which no running VM that users copy does; `qemu-img` never pays it."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu_seconds() -> float:
        # The process's own utime and stime (fields 14 and 15): they include threads that exited,
        # which a sum over /proc/PID/task would lose.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    started = time.monotonic()
    last, quiet = cpu_seconds(), 0
    while time.monotonic() - started < timeout:
        time.sleep(0.5)
        now = cpu_seconds()
        quiet = quiet + 1 if now - last < 0.05 else 0
        if quiet == 2:
            return time.monotonic() - started
        last = now
    raise RuntimeError(f"QEMU {pid} still busy after {timeout:.0f} s")


# --- libvirtd --------------------------------------------------------------------------------------


def ensure_libvirt() -> None:
    if shutil.which("virsh") and Path(LIBVIRTD).exists():
        return
    packages = ["libvirt-daemon-system", "libvirt-clients"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"installing {' '.join(packages)} (apt-get)")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(install, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(install, env=env, check=True)


def _private_qemu_conf(conf: bytes) -> None:
    """In the child before exec: a private mount namespace whose /etc/libvirt/qemu.conf is ``conf``."""
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newns, ms_rec, ms_private, ms_bind = 0x00020000, 0x4000, 1 << 18, 0x1000
    if libc.unshare(clone_newns) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if libc.mount(b"none", b"/", None, ms_rec | ms_private, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    if libc.mount(conf, b"/etc/libvirt/qemu.conf", None, ms_bind, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --bind qemu.conf")


class Libvirtd:
    """libvirtd started by this benchmark (foreground process, stopped with SIGTERM), debug log of
    the QEMU monitor traffic in ``log``."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "libvirtd"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "libvirtd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        ensure_libvirt()
        if virsh("version", check=False).returncode == 0:
            raise RuntimeError("a libvirtd already answers on qemu:///system; this benchmark starts and stops its own")
        qemu_conf = self.dir / "qemu.conf"
        qemu_conf.write_text('user = "+0"\ngroup = "+0"\nstdio_handler = "file"\n')
        conf = self.dir / "libvirtd.conf"
        conf.write_text(f'log_filters = "1:qemu.qemu_monitor 3:*"\nlog_outputs = "1:file:{self.log}"\n')
        with open(self.dir / "libvirtd.stderr", "wb") as err:
            self.proc = subprocess.Popen(
                [LIBVIRTD, "-f", str(conf), "-p", str(self.dir / "libvirtd.pid")], stdin=subprocess.DEVNULL,
                stdout=err, stderr=err, preexec_fn=functools.partial(_private_qemu_conf, bytes(qemu_conf)))
        deadline = time.monotonic() + 30
        while virsh("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd did not start: {(self.dir / 'libvirtd.stderr').read_text()}")
            time.sleep(0.2)

    def version(self) -> str:
        return virsh("version").stdout.strip().replace("\n", "; ")

    def stop(self) -> None:
        if self.proc is None:
            return
        virsh("destroy", DOMAIN, check=False)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None

    def log_offset(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def monitor_traffic(self, since: int) -> list[dict[str, Any]]:
        """QMP messages libvirt sent and received since the log offset ``since``, with libvirt's times."""
        with open(self.log, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        out = []
        for m in _LOG_LINE.finditer(text):
            stamp = datetime.datetime.strptime(m["at"], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=datetime.UTC)
            try:
                body = json.loads(m["body"])
            except json.JSONDecodeError:
                continue
            out.append({"at": stamp.timestamp(), "kind": m["kind"], "body": body})
        return out


_LOG_LINE = re.compile(r"^(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\+0000: \d+: \w+ : \w+:\d+ : "
                       r"QEMU_MONITOR_(?P<kind>SEND_MSG|RECV_REPLY|RECV_EVENT): mon=\S+ \w+=(?P<body>\{.*\})\s*$",
                       re.MULTILINE)


def libvirt_pivot_window(traffic: list[dict[str, Any]]) -> dict[str, Any]:
    """libvirt's pivot: from its first command after READY that is not a query (its pivot starts
    with a bitmap transaction, then job-complete) to the reply of its last cleanup command
    (blockdev-del of the old nodes)."""
    ready = next((t["at"] for t in traffic if t["kind"] == "RECV_EVENT"
                  and t["body"].get("event") == "BLOCK_JOB_READY"), None)
    if ready is None:
        return {}
    sent = {t["body"].get("id"): t for t in traffic if t["kind"] == "SEND_MSG"}
    start = next((t for t in traffic if t["kind"] == "SEND_MSG" and t["at"] >= ready
                  and not t["body"].get("execute", "").startswith("query-")), None)
    if start is None:
        return {}
    replies = [t for t in traffic if t["kind"] == "RECV_REPLY" and t["at"] >= start["at"]]
    cleanup = [t for t in replies if sent.get(t["body"].get("id"), {}).get("body", {}).get("execute")
               in ("blockdev-del", "job-dismiss")]
    end = (cleanup or replies)[-1]
    commands = [(round(t["at"], 3), t["body"].get("execute")) for t in traffic
                if t["kind"] == "SEND_MSG" and start["at"] <= t["at"] <= end["at"]]
    return {"start": start["at"], "end": end["at"], "first": start["body"].get("execute"), "commands": commands}


# --- QEMU event tap ----------------------------------------------------------------------------------


class EventTap:
    """A passive QMP client on the extra monitor both VMs have: records every event (QEMU's
    timestamp and the host's receive time). ``command`` is used only outside the measurements."""

    def __init__(self, path: Path, alive: Callable[[], bool] | None = None) -> None:
        wait_for_path(path, alive=alive)
        self.sock = connect_unix(path)
        self.stream = self.sock.makefile("rwb", buffering=0)
        self.events: list[dict[str, Any]] = []
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        json.loads(self.stream.readline())  # greeting
        self.thread = threading.Thread(target=self._read, daemon=True, name="event-tap")
        self.thread.start()
        self.command("qmp_capabilities")

    def _read(self) -> None:
        for line in self.stream:
            msg = json.loads(line)
            if "event" in msg:
                stamp = msg.get("timestamp", {})
                msg["qemu_at"] = stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1e6
                msg["host_at"] = time.time()
                self.events.append(msg)
            else:
                self.replies.put(msg)

    def command(self, name: str, arguments: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.stream.write(json.dumps(msg).encode() + b"\n")
        reply = self.replies.get(timeout=timeout)
        if "error" in reply:
            raise RuntimeError(f"{name}: {reply['error']}")
        return reply.get("return")

    def first(self, event: str, pred: Callable[[dict[str, Any]], bool] = lambda _e: True) -> float | None:
        return next((e["qemu_at"] for e in self.events if e["event"] == event and pred(e)), None)

    def mirror_times(self) -> tuple[float | None, float | None]:
        """(created, READY) of the mirror job, by QEMU's clock (libvirt's blockdev-create job excluded)."""
        def mirror(e: dict[str, Any]) -> bool:
            return not str(e["data"].get("id", "")).startswith("create-")

        created = self.first("JOB_STATUS_CHANGE", lambda e: e["data"].get("status") == "created" and mirror(e))
        return created, self.first("BLOCK_JOB_READY")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=5)


# --- the rig: libvirt domain and the standalone copy of its command line -------------------------


@dataclass(frozen=True)
class Guest:
    kernel: Path
    initrd: Path
    cmdline: str


def domain_xml(accel: str, image: Path, files: Path, guest: Guest | None) -> str:
    ET.register_namespace("qemu", QEMU_NS)
    dom = ET.Element("domain", type="kvm" if accel == "kvm" else "qemu")
    ET.SubElement(dom, "name").text = DOMAIN
    ET.SubElement(dom, "memory", unit="MiB").text = str(GUEST_MIB)
    ET.SubElement(dom, "vcpu").text = "1"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc-i440fx-7.2").text = "hvm"
    if guest is not None:
        ET.SubElement(os_, "kernel").text = str(guest.kernel)
        ET.SubElement(os_, "initrd").text = str(guest.initrd)
        ET.SubElement(os_, "cmdline").text = guest.cmdline
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"
    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "emulator").text = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2", cache="none")
    ET.SubElement(disk, "source", file=str(image))
    ET.SubElement(disk, "target", dev=DISK_TARGET, bus="virtio")
    if guest is not None:  # as GuestVM: console on the first serial port, acks on the second
        for port, name in enumerate(("guest.console", "guest.acks")):
            serial = ET.SubElement(devices, "serial", type="file")
            ET.SubElement(serial, "source", path=str(files / name))
            ET.SubElement(serial, "target", port=str(port))
    ET.SubElement(ET.SubElement(devices, "video"), "model", type="none")
    ET.SubElement(devices, "memballoon", model="none")
    extra = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
    for value in ("-qmp", f"unix:{files / 'events.qmp'},server=on,wait=off"):
        ET.SubElement(extra, f"{{{QEMU_NS}}}arg", value=value)
    return ET.tostring(dom, encoding="unicode")


def qemu_pid_of_domain() -> int:
    pid_file = Path(f"/run/libvirt/qemu/{DOMAIN}.pid")
    return int(pid_file.read_text().strip())


def cmdline_of(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")


def fdsets_of(pid: int, tap: EventTap) -> dict[str, str]:
    """The file behind each fd set libvirt passed to QEMU (``-add-fd``; set -> path), from
    ``query-fdsets`` (QEMU keeps its own copy of each fd) and /proc."""
    return {str(fdset["fdset-id"]): os.readlink(f"/proc/{pid}/fd/{fdset['fds'][0]['fd']}")
            for fdset in tap.command("query-fdsets") if fdset.get("fds")}


def standalone_args(libvirt_args: list[str], fdsets: dict[str, str], lv_dir: Path, bc_dir: Path,
                    qmp: Path) -> tuple[list[str], list[str]]:
    """libvirt's QEMU command line for a standalone QEMU: libvirt's own parts removed, the files libvirt
    passes as fd sets (``-add-fd``, ``/dev/fdset/N``: the serial files) named by their paths, every
    path in ``lv_dir`` moved to ``bc_dir``, blockcopy's QMP socket added. Returns (args, removed)."""

    def moved(value: str) -> str:
        value = re.sub(r"/dev/fdset/(\d+)", lambda m: fdsets[m[1]], value)
        return value.replace(f"{lv_dir}/", f"{bc_dir}/")

    out, removed = [libvirt_args[0]], []
    args = iter(libvirt_args[1:])
    for arg in args:
        if arg == "-S":  # libvirt starts QEMU stopped and sends `cont` when it is set up
            removed.append(arg)
            continue
        if arg in ("-mon", "-sandbox", "-chardev", "-object", "-add-fd", "-name"):
            value = next(args)
            libvirts = (arg in ("-mon", "-sandbox", "-add-fd") or (arg == "-chardev" and "charmonitor" in value)
                        or (arg == "-object" and '"secret"' in value))
            if libvirts:
                removed += [arg, value]
                continue
            if arg == "-name":
                value = value.replace(f"guest={DOMAIN},", f"guest={DOMAIN}-bc,")
            out += [arg, moved(value)]
            continue
        out.append(moved(arg))
    out += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    return out, removed


@dataclass
class VM:
    """One running VM of the rig: libvirt's domain or the standalone QEMU."""

    side: str  # "libvirt" or "blockcopy"
    dir: Path
    tap: EventTap
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None  # the standalone QEMU
    extra: dict[str, Any] = field(default_factory=dict)

    def pause(self) -> None:
        """Stop the guest (QEMU flushes every image), so the image files can be read."""
        if self.proc is None:
            virsh("suspend", DOMAIN)
        else:
            self.tap.command("stop")

    def kill(self) -> None:
        self.tap.close()
        if self.proc is None:
            virsh("destroy", DOMAIN, check=False)
        else:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=30)


def start_libvirt_vm(lv_dir: Path, image: Path, accel: str, guest: Guest | None) -> VM:
    (lv_dir / "events.qmp").unlink(missing_ok=True)
    xml = lv_dir / "domain.xml"
    xml.write_text(domain_xml(accel, image, lv_dir, guest))
    virsh("create", str(xml))
    pid = qemu_pid_of_domain()
    tap = EventTap(lv_dir / "events.qmp", alive=lambda: Path(f"/proc/{pid}").exists())
    args = cmdline_of(pid)
    return VM("libvirt", lv_dir, tap, args, extra={"fdsets": fdsets_of(pid, tap)})


def start_standalone_vm(rig: Rig) -> VM:
    bc_dir = rig.bc
    qmp = bc_dir / "blockcopy.qmp"
    for stale in (qmp, bc_dir / "events.qmp"):
        stale.unlink(missing_ok=True)
    args, removed = standalone_args(rig.libvirt_args, rig.fdsets, rig.lv, bc_dir, qmp)
    with open(bc_dir / "qemu.log", "wb") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        wait_for_path(qmp, alive=lambda: proc.poll() is None)
        tap = EventTap(bc_dir / "events.qmp", alive=lambda: proc.poll() is None)
    except BaseException as exc:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"standalone QEMU failed: {(bc_dir / 'qemu.log').read_text(errors='replace')}") from exc
    return VM("blockcopy", bc_dir, tap, args, proc, {"removed": removed, "qmp": qmp})


# --- throughput ------------------------------------------------------------------------------------


def make_source(path: Path, size_mib: int, sparse: bool) -> None:
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as out:
        for mib in range(size_mib):
            if sparse and mib % 2:
                out.seek(MIB, os.SEEK_CUR)
            else:
                out.write(os.urandom(MIB))
        out.truncate(size_mib * MIB)
    run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(path)])
    raw.unlink()
    fsync_path(path)


def copy_image(src: Path, dst: Path) -> None:
    run(["cp", "--sparse=always", str(src), str(dst)])
    fsync_path(dst)


def images_equal(a: Path, b: Path) -> bool:
    return run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", str(a), str(b)], check=False).returncode == 0


@dataclass
class Rig:
    work: Path
    libvirtd: Libvirtd
    accel: str
    libvirt_args: list[str] = field(default_factory=list)
    fdsets: dict[str, str] = field(default_factory=dict)
    standalone: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def lv(self) -> Path:
        return self.work / "lv"

    @property
    def bc(self) -> Path:
        return self.work / "bc"


def probe_command_lines(rig: Rig, image: Path, guest: Guest | None) -> None:
    """Start libvirt's domain once to read its command line, and derive the standalone one from it."""
    vm = start_libvirt_vm(rig.lv, image, rig.accel, guest)
    try:
        rig.libvirt_args, rig.fdsets = vm.args, vm.extra["fdsets"]
    finally:
        vm.kill()
    rig.standalone, rig.removed = standalone_args(rig.libvirt_args, rig.fdsets, rig.lv, rig.bc,
                                                  rig.bc / "blockcopy.qmp")


def timed(argv: list[str], dest: Path) -> tuple[float, float, float, subprocess.CompletedProcess[str]]:
    """(seconds, wall start, wall end) of ``argv`` then ``sync -f DEST``."""
    wall = time.time()
    started = time.perf_counter()
    proc = run(argv, check=False)
    if proc.returncode == 0:
        sync_file(dest)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return elapsed, wall, wall + elapsed, proc


def tool_libvirt(rig: Rig) -> dict[str, Any]:
    vm = start_libvirt_vm(rig.lv, rig.lv / "source.qcow2", rig.accel, None)
    dest = rig.lv / "dest.qcow2"
    try:
        wait_until_idle(qemu_pid_of_domain())
        drop_caches()
        offset = rig.libvirtd.log_offset()
        seconds, start, _end, _p = timed(["virsh", "-c", URI, "blockcopy", DOMAIN, DISK_TARGET, str(dest),
                                          "--wait", "--pivot", "--transient-job"], dest)
        created, ready = vm.tap.mirror_times()
        traffic = rig.libvirtd.monitor_traffic(offset)
        pivot = libvirt_pivot_window(traffic)
    finally:
        vm.kill()
    return {"seconds": seconds, "start": start, "created": created, "ready": ready,
            "pivot_window_ms": round((pivot["end"] - pivot["start"]) * 1000, 2) if pivot else None, "dest": dest}


def tool_blockcopy(rig: Rig, extra: list[str], *, through_daemon: bool = False) -> dict[str, Any]:
    """``blockcopy copy --pivot`` on the standalone VM, or, ``through_daemon``, answered by a
    ``blockcopy serve`` that serves the state directory. The daemon must still run when the command
    has ended: the CLI would otherwise have run the command itself (it falls back to that, silently,
    when no daemon answers)."""
    vm = start_standalone_vm(rig)
    dest = rig.bc / "dest.qcow2"
    state = rig.bc / "state"
    daemon: subprocess.Popen[bytes] | None = None
    try:
        shutil.rmtree(state, ignore_errors=True)
        cli = blockcopy_cli()
        if through_daemon:
            with open(rig.bc / "daemon.log", "ab") as log:
                daemon = subprocess.Popen([*cli, "serve", "--state-dir", str(state)], stdout=log, stderr=log)
            wait_for_path(state / "run" / "blockcopy.sock",
                          alive=lambda: daemon is not None and daemon.poll() is None)
        run([*cli, "attach", DOMAIN, "--qmp", str(vm.extra["qmp"]), "--state-dir", str(state)])
        assert vm.proc is not None
        wait_until_idle(vm.proc.pid)
        drop_caches()
        seconds, start, _end, proc = timed([*cli, "copy", DOMAIN, QDEV, str(dest), "--pivot", "--json",
                                            "--state-dir", str(state), *extra], dest)
        if daemon is not None and daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited during the copy ({daemon.returncode}): the CLI ran it itself")
        created, ready = vm.tap.mirror_times()
        op = json.loads(proc.stdout)
    finally:
        if daemon is not None:
            daemon.terminate()
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        vm.kill()
    assert op["outcome"] == "pivoted", op
    return {"seconds": seconds, "start": start, "created": created, "ready": ready,
            "pause_window_ms": op.get("pause_window_ms"), "dest": dest}


def tool_command(argv: list[str], dest: Path) -> dict[str, Any]:
    drop_caches()
    seconds, start, _end, _p = timed(argv, dest)
    return {"seconds": seconds, "start": start, "dest": dest}


PAGE_CACHE_FILL_SIDE = "blockcopy-pcf"


def side_args(side: str) -> list[str]:
    """The CLI options of a blockcopy column: "blockcopy", "blockcopy-SIZE" (--buf-size SIZE) or
    PAGE_CACHE_FILL_SIDE (--page-cache-fill)."""
    if side == PAGE_CACHE_FILL_SIDE:
        return ["--page-cache-fill"]
    return ["--buf-size", side.split("-", 1)[1]] if "-" in side else []


def throughput_case(rig: Rig, size_mib: int, sparse: bool, reps: int, alt_bufs: list[str],
                    daemon_bufs: list[str], page_cache_fill: bool = False) -> dict[str, Any]:
    master = rig.work / "source.qcow2"
    make_source(master, size_mib, sparse)
    for side in (rig.lv, rig.bc):  # the disk of each VM, a copy of the same image
        copy_image(master, side / "source.qcow2")
    tools: dict[str, Callable[[], dict[str, Any]]] = {
        "libvirt": lambda: tool_libvirt(rig),
        "qemu-img": lambda: tool_command(["qemu-img", "convert", "-O", "qcow2", str(master),
                                          str(rig.work / "dest.qcow2")], rig.work / "dest.qcow2"),
        "cp": lambda: tool_command(["cp", "--sparse=always", str(master), str(rig.work / "dest.qcow2")],
                                   rig.work / "dest.qcow2"),
        "blockcopy": lambda: tool_blockcopy(rig, []),
    }
    for size in alt_bufs:
        tools[f"blockcopy-{size}"] = functools.partial(tool_blockcopy, rig, side_args(f"blockcopy-{size}"))
    if page_cache_fill:
        tools[PAGE_CACHE_FILL_SIDE] = functools.partial(tool_blockcopy, rig, side_args(PAGE_CACHE_FILL_SIDE))
    for size in daemon_bufs:
        name, extra = ("blockcopy-daemon", []) if size == "default" else (f"blockcopy-daemon-{size}",
                                                                          ["--buf-size", size])
        tools[name] = functools.partial(tool_blockcopy, rig, extra, through_daemon=True)
    names = list(tools)
    raw: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    label = f"{size_mib} MiB{' half sparse' if sparse else ''} random"
    for rep in range(reps):
        for name in rep_order(names, rep):
            try:
                result = tools[name]()
            except (RuntimeError, AssertionError, TimeoutError,
                    subprocess.CalledProcessError) as exc:  # recorded, not fatal
                raw[name].append({"rep": rep, "error": str(exc)})
                print(f"  {label} rep {rep} {name:>13}: FAILED {exc}", flush=True)
                for dest in (rig.work / "dest.qcow2", rig.lv / "dest.qcow2", rig.bc / "dest.qcow2"):
                    dest.unlink(missing_ok=True)
                continue
            dest = result.pop("dest")
            result["equal"] = images_equal(master, dest)
            result["rep"] = rep
            if result.get("created") and result.get("ready"):
                result["mirror_s"] = result["ready"] - result["created"]
                result["start_to_created_s"] = result["created"] - result["start"]
                result["ready_to_end_s"] = result["start"] + result["seconds"] - result["ready"]
            raw[name].append(result)
            dest.unlink()
            os.sync()
            print(f"  {label} rep {rep} {name:>13}: {result['seconds']:.3f} s"
                  + (f", mirror {result['mirror_s']:.3f} s" if "mirror_s" in result else "")
                  + ("" if result["equal"] else "  COPY DIFFERS"), flush=True)
    master.unlink()
    for side in (rig.lv, rig.bc):
        (side / "source.qcow2").unlink()
    return summarize_throughput(label, size_mib, raw)


def rep_order(names: list[str], rep: int) -> list[str]:
    """The sides' order in rep ``rep``: the rows of a Williams design (a balanced Latin square),
    one row per rep, cycled. Over n reps (2n when n, the number of sides, is odd) every side takes
    every position equally often and, within a rep, comes right after every other side equally
    often. A plain rotation keeps the cycle: each side would come right after the same side in every
    rep, and what a side leaves behind (the discard of the GiB it just deleted on a file system
    mounted with `discard`, the host flushing what it wrote) would always land on the same next
    side, as the daemon's column right after `blockcopy-1M`'s did in `throughput_rig2_daemon`.
    Partial unless the reps are a multiple of the rows (7 reps over 5 or 6 sides are not), and the
    last side of a rep is followed by the first of the next, which the design does not count."""
    n = len(names)
    if not n:
        return []
    base = [0] + [(j + 1) // 2 if j % 2 else n - j // 2 for j in range(1, n)]
    rows = n if n % 2 == 0 else 2 * n
    row = rep % rows
    order = [names[(b + row) % n] for b in base]
    return order[::-1] if row >= n else order


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarize_throughput(label: str, size_mib: int, raw: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    secs = {name: {r["rep"]: r["seconds"] for r in rows if "seconds" in r} for name, rows in raw.items()}

    def ratios(a: str, b: str) -> list[float]:  # throughput of a / throughput of b, per rep (both ran)
        return [round(secs[b][rep] / secs[a][rep], 3) for rep in sorted(secs[a]) if rep in secs[b]]

    pairs = [("blockcopy", "libvirt"), ("blockcopy", "qemu-img"), ("libvirt", "qemu-img"), ("blockcopy", "cp")]
    for alt in (name for name in secs if name.startswith("blockcopy-")):
        pairs += [(alt, "libvirt"), (alt, "qemu-img"), (alt, "blockcopy")]
        if alt.startswith("blockcopy-daemon-") and f"blockcopy-{alt.rsplit('-', 1)[1]}" in secs:
            pairs.append((alt, f"blockcopy-{alt.rsplit('-', 1)[1]}"))  # the same buffer without the daemon
    per_rep = {f"{a}/{b}": ratios(a, b) for a, b in pairs}
    tools = {}
    for name, rows in raw.items():
        ok = [r for r in rows if "seconds" in r]
        med = statistics.median(r["seconds"] for r in ok)
        tools[name] = {"median_s": round(med, 3), "mib_s": round(size_mib / med, 1), "failed": len(rows) - len(ok),
                       **{f"{key}_median_s": _median([r[f"{key}_s"] for r in ok if f"{key}_s" in r])
                          for key in ("mirror", "start_to_created", "ready_to_end")},
                       "all_equal": all(r["equal"] for r in ok), "runs": rows}
    return {"image": label, "size_mib": size_mib, "tools": tools, "ratios_per_rep": per_rep,
            "ratio_medians": {k: _median(v) for k, v in per_rep.items()}}


def print_throughput(cases: list[dict[str, Any]]) -> None:
    print(f"\n{'image':>24} {'tool':>14} {'median s':>9} {'MiB/s':>8} {'mirror s':>9} {'start->job s':>12} "
          f"{'READY->end s':>12} {'equal':>6}")

    def cell(value: float | None, width: int) -> str:
        return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"

    for case in cases:
        for name, t in case["tools"].items():
            print(f"{case['image']:>24} {name:>14} {t['median_s']:>9.3f} {t['mib_s']:>8.1f} "
                  f"{cell(t['mirror_median_s'], 9)} {cell(t['start_to_created_median_s'], 12)} "
                  f"{cell(t['ready_to_end_median_s'], 12)} {'yes' if t['all_equal'] else 'NO':>6}"
                  + (f"  ({t['failed']} failed)" if t["failed"] else ""))
    print(f"\n{'image':>24} {'throughput ratio':>26} {'median':>7}  per rep")
    for case in cases:
        for key, values in case["ratios_per_rep"].items():
            print(f"{case['image']:>24} {key:>26} {cell(case['ratio_medians'][key], 7)}  "
                  f"{' '.join(f'{v:.2f}' for v in values)}")


def bench_throughput(rig: Rig, args: argparse.Namespace) -> dict[str, Any]:
    cases = [(1024, False)] if args.quick else [(1024, False), (1024, True), (4096, False)]
    probe = rig.lv / "source.qcow2"  # the path every libvirt run uses, so that the standalone's is bc/source.qcow2
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(probe), "64M"])
    probe_command_lines(rig, probe, None)
    probe.unlink()
    print_command_lines(rig)
    results = [throughput_case(rig, size, sparse, args.reps, args.alt_buf, args.daemon_buf, args.page_cache_fill)
               for size, sparse in cases]
    print_throughput(results)
    return {"libvirt_command_line": rig.libvirt_args, "standalone_command_line": rig.standalone,
            "removed_from_libvirt_command_line": rig.removed, "accel": rig.accel, "reps": args.reps,
            "cases": results}


def print_command_lines(rig: Rig) -> None:
    print("libvirt's QEMU command line:\n  " + " ".join(rig.libvirt_args))
    print("standalone QEMU for blockcopy:\n  " + " ".join(rig.standalone))
    print("removed from libvirt's: " + " ".join(rig.removed))


# --- stall ----------------------------------------------------------------------------------------


def blockcopy_pivot_window(state: Path, job: str, tap: EventTap) -> dict[str, Any]:
    """blockcopy's pivot: QEMU's STOP event to the journaled end, which follows the reply of its last
    cleanup command (job-dismiss and blockdev-del, sent together)."""
    status = json.loads(run([*blockcopy_cli(), "status", job, "--log", "--json", "--state-dir", str(state)]).stdout)
    stop = tap.first("STOP")
    log = status.get("log", [])
    end = log[-1]["at"] if log else None  # journaled after the cleanup replies: a bound from above
    dismissed = tap.first("JOB_STATUS_CHANGE", lambda e: e["data"].get("status") == "null")
    return {"start": stop, "end": end, "dismissed": dismissed, "resume": tap.first("RESUME"), "log": log,
            "pause_window_ms": status.get("pause_window_ms")}


#: The floor sides (see bare_pivot): QEMU's least pausing pivot; with blockcopy's two fsynced commits;
#: and with blockcopy's observations inside the pause too (its QMP traffic, without its client stack).
FLOOR_SIDES = ("bare-pause", "bare-pause+journal", "bare-pause+journal+queries")


class BareQMP:
    """The least QMP client, for the floor sides: one thread, a blocking socket read through a
    buffer, commands written back to back when they need not wait for each other (QEMU runs them
    in order and answers in order), events collected while replies are read."""

    def __init__(self, path: Path) -> None:
        self.sock = connect_unix(path)  # (blockcopy's connection was just killed)
        try:
            self.sock.settimeout(60)
            self.reader = self.sock.makefile("rb")
            self.events: list[dict[str, Any]] = []
            json.loads(self.reader.readline())  # greeting
            self.execute("qmp_capabilities")
        except BaseException:
            if hasattr(self, "reader"):
                self.reader.close()  # (the socket's descriptor stays open while its file object is)
            self.sock.close()
            raise

    def send(self, name: str, arguments: dict[str, Any] | None = None) -> None:
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def _next(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise RuntimeError("QEMU closed the QMP connection")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def reply(self) -> Any:
        """The next reply (events before it are kept)."""
        while True:
            msg = self._next()
            if "event" in msg:
                self.events.append(msg)
            elif "error" in msg:
                raise RuntimeError(f"QMP: {msg['error']}")
            else:
                return msg.get("return")

    def execute(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        self.send(name, arguments)
        return self.reply()

    def until(self, done: Callable[[list[dict[str, Any]]], bool]) -> None:
        """Read events until ``done(events so far)``."""
        while not done(self.events):
            msg = self._next()
            if "event" not in msg:
                raise RuntimeError(f"unexpected reply {msg}")
            self.events.append(msg)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def _device_node(block: list[dict[str, Any]]) -> str:
    devices = [d for d in block if d.get("qdev", "").endswith(f"/{QDEV}/virtio-backend")]
    if not devices:
        raise RuntimeError(f"no device {QDEV} in query-block")
    return str(devices[0]["inserted"]["node-name"])


def _wait_event(vm: VM, name: str, after: float | None = None) -> float:
    """QEMU's time of the first ``name`` event (after ``after``) on the passive monitor, which its
    own thread reads: waited for, briefly."""
    deadline = time.monotonic() + 5
    while (at := vm.tap.first(name, lambda e: after is None or e["qemu_at"] >= after)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {name} event on the passive monitor")
        time.sleep(0.01)
    return at


def bare_pivot(vm: VM, state: Path, side: str, images: list[Path]) -> dict[str, Any]:
    """The floor of a pivot that pauses the guest, for the FLOOR_SIDES, on the VM state blockcopy
    leaves when it is killed right after journaling PIVOTING (DEST reopened with the source's cache
    mode, every job ready, the guest running), over blockcopy's QMP socket. Before ``stop``, as
    blockcopy does: the image files are fsynced (``images``), and an SQLite database in blockcopy's
    journal mode (WAL, synchronous=FULL, in the state directory; made for every side, so that
    each does the same before ``stop``) gets a commit after a checkpoint, as blockcopy's PIVOTING
    save empties the WAL so that the pause's commits overwrite it.

    ``bare-pause``: ``stop`` and every ``job-complete`` written together; once every job is
    ``pending``, every ``job-finalize`` and ``cont`` together; then ``job-dismiss``. No journal,
    no observation: QEMU's least command sequence.

    ``bare-pause+journal``: the same with a commit once every job is pending and another after the
    finalize replies, before ``cont`` (where blockcopy makes its two). Each commit writes one small
    row; blockcopy's saves also write a step and an event row, so these fsyncs are a little lighter.

    ``bare-pause+journal+queries``: that, plus the observations blockcopy makes inside the pause
    for one disk, sent where it sends them (with several jobs blockcopy may observe once more per
    job turning ``pending``; and it sends the job-completes only after ``stop``'s answer, which no
    floor side reproduces): ``query-status``, ``query-jobs`` and ``query-block`` behind the
    job-completes (and again after the ``pending`` events when that answer came too early), and
    ``query-jobs`` and ``query-block`` behind the job-finalizes, whose answer (the device on DEST)
    comes before the second commit. blockcopy's QMP traffic in the pause, without its client stack
    (asyncio, ``qemu.qmp``), its decisions and its records' encoding.

    Window: QEMU's STOP to the ``job-dismiss`` reply, as blockcopy's ends after its cleanup replies."""
    journal = "+journal" in side
    queries = side.endswith("+queries")
    qmp = BareQMP(vm.extra["qmp"])
    db = None
    try:
        jobs = [j["id"] for j in qmp.execute("query-jobs") if j["status"] == "ready"]
        if not jobs:
            raise RuntimeError("no ready job left by blockcopy")
        source_node = _device_node(qmp.execute("query-block"))

        def commit(n: int) -> None:
            if db is not None:
                db.execute("BEGIN IMMEDIATE")
                db.execute("UPDATE t SET record = ? WHERE k = 1", (str(n % 10) * 2048,))
                db.execute("COMMIT")

        def all_pending(events: list[dict[str, Any]]) -> bool:
            return {e["data"].get("id") for e in events if e["event"] == "JOB_STATUS_CHANGE"
                    and e["data"].get("status") == "pending"} >= set(jobs)

        def observe(names: tuple[str, ...]) -> list[Any]:
            for name in names:
                qmp.send(name)
            return [qmp.reply() for _ in names]

        db = sqlite3.connect(state / "floor.sqlite", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, record TEXT)")
        db.execute("INSERT INTO t VALUES (1, '')")
        for n in range(4):
            commit(n)
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        commit(5)  # PIVOTING's save: restarts the WAL, so that the pause's commits overwrite it
        if not journal:
            db.close()
            db = None
        for image in images:  # blockcopy's sync-images before its stop
            fsync_path(image)
        pivot_queries = ("query-status", "query-jobs", "query-block")
        qmp.send("stop")
        for job in jobs:
            qmp.send("job-complete", {"id": job})
        for name in pivot_queries if queries else ():
            qmp.send(name)
        answers = [qmp.reply() for _ in range(1 + len(jobs) + (len(pivot_queries) if queries else 0))]
        if queries:
            statuses = {j["id"]: j["status"] for j in answers[-2]}
            if not all(statuses.get(job) == "pending" for job in jobs):  # too early: QEMU's next events
                qmp.until(all_pending)
                observe(pivot_queries)
        else:
            qmp.until(all_pending)
        commit(6)
        for job in jobs:
            qmp.send("job-finalize", {"id": job})
        if queries:
            for name in ("query-jobs", "query-block"):
                qmp.send(name)
        if not journal:
            qmp.send("cont")
        answers = [qmp.reply() for _ in range(len(jobs) + (2 if queries else 0) + (0 if journal else 1))]
        if queries and _device_node(answers[-1]) == source_node:
            raise RuntimeError("the device did not switch to DEST")
        if journal:
            commit(7)
            qmp.execute("cont")
        for job in jobs:
            qmp.send("job-dismiss", {"id": job})
        for _ in jobs:
            qmp.reply()
        end = time.time()
        if _device_node(qmp.execute("query-block")) == source_node:
            raise RuntimeError("the device did not switch to DEST")
    finally:
        if db is not None:
            db.close()
        qmp.close()
    stop = _wait_event(vm, "STOP")
    return {"start": stop, "end": end, "resume": _wait_event(vm, "RESUME", after=stop)}


def stall_run(rig: Rig, side: str, master: Path, guest: Guest, run_no: int) -> dict[str, Any]:
    """One copy and pivot of the writer guest's disk by ``side``: "libvirt", "blockcopy",
    "blockcopy-SIZE" (blockcopy with --buf-size SIZE), PAGE_CACHE_FILL_SIDE (--page-cache-fill), or one of
    FLOOR_SIDES (see bare_pivot)."""
    from blockcopy.guest.session import AckLog, verify

    side_dir = rig.lv if side == "libvirt" else rig.bc
    for stale in ("guest.acks", "guest.console"):
        (side_dir / stale).unlink(missing_ok=True)
    source = side_dir / "source.qcow2"
    copy_image(master, source)
    dest = side_dir / "dest.qcow2"
    vm = start_libvirt_vm(rig.lv, source, rig.accel, guest) if side == "libvirt" else start_standalone_vm(rig)
    acklog = AckLog(side_dir / "guest.acks")
    row: dict[str, Any] = {"tool": side, "run": run_no}
    try:
        acklog.wait_for(50)
        if side == "libvirt":
            drop_caches()
            offset = rig.libvirtd.log_offset()
            seconds, _s, _e, _p = timed(["virsh", "-c", URI, "blockcopy", DOMAIN, DISK_TARGET, str(dest),
                                         "--wait", "--pivot", "--transient-job"], dest)
            window = libvirt_pivot_window(rig.libvirtd.monitor_traffic(offset))
        else:
            state = rig.bc / "state"
            shutil.rmtree(state, ignore_errors=True)
            cli = blockcopy_cli()
            run([*cli, "attach", DOMAIN, "--qmp", str(vm.extra["qmp"]), "--state-dir", str(state)])
            drop_caches()
            if side in FLOOR_SIDES:
                # blockcopy copies and is killed once PIVOTING is journaled; this script pivots
                killed = run([*cli, "copy", DOMAIN, QDEV, str(dest), "--pivot", "--json", "--state-dir", str(state)],
                             check=False, env={**os.environ, "BLOCKCOPY_CRASH_AT": "journal:pivoting"})
                assert killed.returncode == -9, (killed.returncode, killed.stderr)
                seconds = 0.0
                window = bare_pivot(vm, state, side, [source, dest])
                window["pause_window_ms"] = round((window["resume"] - window["start"]) * 1000, 2)
            else:
                extra = side_args(side)
                seconds, _s, _e, proc = timed([*cli, "copy", DOMAIN, QDEV, str(dest), "--pivot", "--json",
                                               "--state-dir", str(state), *extra], dest)
                op = json.loads(proc.stdout)
                assert op["outcome"] == "pivoted", op
                window = blockcopy_pivot_window(state, op["id"], vm.tap)
        time.sleep(1.0)  # the guest writes on, on DEST
        vm.pause()
        time.sleep(0.2)
        created, ready = vm.tap.mirror_times()
        acks = list(acklog.acks)
        check = verify(str(dest), "qcow2", acks, 0, 1)
    finally:
        vm.kill()
        acklog.stop()
        source.unlink(missing_ok=True)
        dest.unlink(missing_ok=True)
    assert created is not None and ready is not None and window.get("start") and window.get("end"), (created, ready,
                                                                                                         window)
    row.update({
        "seconds": round(seconds, 3), "mirror_s": round(ready - created, 3),
        "pivot_window_ms": round((window["end"] - window["start"]) * 1000, 2),
        "pivot_stall_ms": round(acklog.max_gap(window["start"], window["end"]) * 1000, 2),
        # blockcopy only: to QEMU's job-dismiss event (sent with the blockdev-del), a bound from below
        "pivot_stall_to_dismiss_ms": (round(acklog.max_gap(window["start"], window["dismissed"]) * 1000, 2)
                                      if window.get("dismissed") else None),
        "copying_gap_ms": round(acklog.max_gap(created, ready) * 1000, 2),
        "pre_ready_gap_ms": round(acklog.max_gap(ready - 1.0, ready) * 1000, 2),
        "acks": len(acks), "acked_writes_checked_on_dest": check.checked, "problems": check.problems[:5],
        "pause_window_ms": window.get("pause_window_ms"),
        "pivot_commands": window.get("commands") or [(round(e["at"], 3), e["note"]) for e in window.get("log", [])],
        "pivot_events": pivot_timeline(vm.tap.events, window["start"], window["end"]),
        # the guest's acknowledged writes around the pivot window, ms after its start (host times):
        # where the largest gap lies against QEMU's STOP and RESUME
        "pivot_acks_ms": [round((a.at - window["start"]) * 1000, 2) for a in acks
                          if window["start"] - 0.02 <= a.at <= window["end"] + 0.02],
    })
    return row


def pivot_timeline(events: list[dict[str, Any]], start: float, end: float) -> list[tuple[float, str, str]]:
    """QEMU's events from 50 ms before the pivot window to its end, in ms after its start, by QEMU's
    event times: what the stall is made of, e.g. STOP -> JOB_STATUS_CHANGE pending -> RESUME. The
    window starts at QEMU's STOP for blockcopy, at libvirtd's log time of its first pivot command
    for libvirt (the same host clock)."""
    return [(round((e["qemu_at"] - start) * 1000, 2), e["event"], str(e.get("data", {}).get("status", "")))
            for e in events if start - 0.05 <= e["qemu_at"] <= end]


def bench_stall(rig: Rig, args: argparse.Namespace) -> dict[str, Any]:
    from blockcopy.guest.build import build
    from blockcopy.guest.session import pick_guest_accel

    image = build()
    accel = pick_guest_accel()
    rig = Rig(rig.work, rig.libvirtd, accel)
    guest = Guest(image.kernel, image.initrd,
                  f"console=ttyS0 quiet panic=-1 bc.disks={DISK_TARGET} bc.args=-r,1,-n,1024,-i,2000")
    master = rig.work / "guest-source.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(master), f"{GUEST_MIB}M"])
    run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5c 8M {GUEST_MIB - 8}M", str(master)])
    fsync_path(master)
    copy_image(master, rig.lv / "source.qcow2")
    probe_command_lines(rig, rig.lv / "source.qcow2", guest)
    print(f"guest on {accel}, {GUEST_MIB} MiB disk, writer 4 KiB O_DIRECT every 2 ms")
    print_command_lines(rig)
    runs = []
    sides = ["libvirt", "blockcopy", *(f"blockcopy-{size}" for size in args.stall_alt_buf),
             *([PAGE_CACHE_FILL_SIDE] if args.page_cache_fill else []),
             *(FLOOR_SIDES if args.stall_floor else ())]
    for n in range(args.reps):
        for side in (sides if n % 2 == 0 else sides[::-1]):
            try:
                row = stall_run(rig, side, master, guest, n)
            except (RuntimeError, AssertionError, TimeoutError, subprocess.CalledProcessError, OSError, sqlite3.Error,
                    ValueError, LookupError) as exc:
                runs.append({"tool": side, "run": n, "error": str(exc)})  # recorded, not fatal
                print(f"  run {n} {side:>13}: FAILED {exc}", flush=True)
                continue
            runs.append(row)
            print(f"  run {n} {side:>13}: {row['seconds']:.2f} s, mirror {row['mirror_s']:.2f} s, pivot window "
                  f"{row['pivot_window_ms']} ms, pivot stall {row['pivot_stall_ms']} ms, copying gap "
                  f"{row['copying_gap_ms']} ms, pre-READY gap {row['pre_ready_gap_ms']} ms"
                  + (f", PROBLEMS {row['problems']}" if row["problems"] else ""), flush=True)
    master.unlink()
    summary = {}
    keys = ("pivot_stall_ms", "pivot_window_ms", "copying_gap_ms", "pre_ready_gap_ms", "mirror_s", "seconds")
    print(f"\n{'tool':>13} " + " ".join(f"{k:>16}" for k in keys) + "   (medians; max in brackets)")
    for side in sides:
        rows = [r for r in runs if r["tool"] == side and "error" not in r]
        failed = sum(1 for r in runs if r["tool"] == side and "error" in r)
        if failed:
            print(f"{side:>13}: {failed} run(s) FAILED (see the JSON's errors)")
        if not rows:
            continue
        summary[side] = {k: {"median": _median([r[k] for r in rows]), "max": max(r[k] for r in rows)} for k in keys}
        summary[side]["failed_runs"] = failed
        lower = [r["pivot_stall_to_dismiss_ms"] for r in rows if r.get("pivot_stall_to_dismiss_ms") is not None]
        if lower:
            summary[side]["pivot_stall_to_dismiss_ms"] = {"median": _median(lower), "max": max(lower)}
        cells = [f"{summary[side][k]['median']} [{summary[side][k]['max']}]" for k in keys]
        print(f"{side:>13} " + " ".join(f"{c:>16}" for c in cells))
    return {"guest_accel": accel, "libvirt_command_line": rig.libvirt_args, "standalone_command_line": rig.standalone,
            "removed_from_libvirt_command_line": rig.removed, "guest_cmdline": guest.cmdline, "runs": runs,
            "summary": summary}


# --- main -----------------------------------------------------------------------------------------


def environment(workdir: Path, libvirtd: Libvirtd) -> dict[str, Any]:
    qemu = run(["qemu-system-x86_64", "--version"]).stdout.split("\n")[0]
    fs = run(["findmnt", "-no", "FSTYPE,SOURCE,OPTIONS", "-T", str(workdir)]).stdout.strip()
    return {"qemu": qemu, "libvirt": libvirtd.version(), "accel": pick_accel(), "filesystem": fs,
            "kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "cache": "cache=none (cache.direct=on), page cache dropped "
            "before every tool", "blockcopy_cli": blockcopy_cli(), "code": code_version()}


def code_version() -> str:
    """The commit the worktree (which the rig installs) is at, and whether it has changes."""
    top = Path(__file__).parents[1]
    commit = run(["git", "-C", str(top), "rev-parse", "--short", "HEAD"], check=False).stdout.strip()
    dirty = run(["git", "-C", str(top), "status", "--porcelain", "--", "src"], check=False).stdout.strip()
    return f"{commit or 'unknown'}{' + uncommitted changes in src' if dirty else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="all", choices=["throughput", "stall", "all"])
    parser.add_argument("--reps", type=int, default=None, help="reps per tool (default 7; --quick: 3)")
    parser.add_argument("--quick", action="store_true", help="1 GiB random only, 3 reps")
    parser.add_argument("--alt-buf", nargs="*", default=["16M", "1M"], metavar="SIZE",
                        help="extra blockcopy columns with these --buf-size values (default: 16M 1M)")
    parser.add_argument("--daemon-buf", nargs="*", default=[], metavar="SIZE",
                        help="throughput: extra columns through `blockcopy serve` with these --buf-size values "
                        "('default': blockcopy's default buffer; default: none)")
    parser.add_argument("--stall-alt-buf", nargs="*", default=[], metavar="SIZE",
                        help="stall: extra blockcopy runs with these --buf-size values (default: none)")
    parser.add_argument("--page-cache-fill", action="store_true",
                        help="also a blockcopy column with --page-cache-fill (throughput and stall)")
    parser.add_argument("--stall-floor", action="store_true",
                        help="stall: also the floor of a pausing pivot, bare QMP with and without two journal "
                        "commits (the bare-pause sides)")
    parser.add_argument("--section", metavar="NAME", help="the JSON section to write (default: the mode's, "
                        "with _quick for --quick), so that a run with other columns keeps the others")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                        help="where images go (its file system is measured)")
    args = parser.parse_args(argv)
    args.reps = args.reps or (3 if args.quick else 7)
    if args.section and args.mode == "all":
        parser.error("--section takes one mode: throughput or stall")
    if args.quick and args.section in ("throughput", "stall"):
        parser.error(f"a --quick run does not go into the full run's section {args.section}")
    if os.geteuid() != 0:
        parser.error("run as root (libvirtd, drop_caches)")
    with tempfile.TemporaryDirectory(prefix="bc-libvirt-", dir=args.workdir) as tmp:
        work = Path(tmp)
        for sub in ("lv", "bc"):
            (work / sub).mkdir()
        libvirtd = Libvirtd(work)
        libvirtd.start()
        try:
            rig = Rig(work, libvirtd, pick_accel())
            env = environment(args.workdir, libvirtd)
            if args.mode in ("throughput", "all"):
                print("== throughput")
                save(args.section or ("throughput_quick" if args.quick else "throughput"),
                     {"environment": env, "quick": args.quick, **bench_throughput(rig, args)})
            if args.mode in ("stall", "all"):
                print("== stall")
                save(args.section or ("stall_quick" if args.quick else "stall"),
                     {"environment": env, "quick": args.quick, **bench_stall(rig, args)})
        finally:
            libvirtd.stop()
    return 0


def save(section: str, data: dict[str, Any]) -> None:
    """Write one mode's results into bench/results/libvirt.json, keeping the other sections (a
    --quick run has its own section, so that it never replaces a full run's)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "libvirt.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    saved[section] = data
    path.write_text(json.dumps(saved, indent=2, sort_keys=True, default=str))
    print(f"wrote {path} ({section})")


if __name__ == "__main__":
    sys.exit(main())
