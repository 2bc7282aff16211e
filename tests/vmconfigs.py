"""Scratch QEMU VMs in production-like disk configurations, for tests (no guest OS).

A :class:`VMConfig` lists :class:`Disk` specs (bus, node options, filters, iothread, legacy ``-drive``,
block devices) and QEMU-wide settings (``-object``s, ``-runas``); :class:`Lab` creates what they need
(images, a directory an unprivileged QEMU can reach, loop devices, LVM volumes, the ``bcqemu`` user),
starts :class:`ConfigVM` (a :class:`blockcopy.vm.ScratchVM`) and undoes all of it in ``close()``, even
after a failure half-way. The functions at the bottom are the configurations; ``CONFIGS`` names them.

Also here, QMP-level helpers that bypass blockcopy's driver: :func:`pivot` (blockdev-add with
:func:`blockcopy.nodes.dest_blockdev_args`, blockdev-mirror with
:func:`blockcopy.nodes.mirror_target_args`, job-complete, job-finalize) and :func:`write_rate`, which
measures the IOPS and bandwidth a device-injected write burst achieves (for throttling checks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockcopy import nodes
from blockcopy.vm import ScratchVM, fill_pattern, make_image

MIB = 1024 * 1024
RUNAS_USER = "bcqemu"
FILL = 0x11  # the pattern every image holds in its first 4 MiB


@dataclass(frozen=True)
class Disk:
    """One disk. Node names: ``<id>-file``, ``<id>-fmt``, ``<id>-throttle`` (``-drive`` disks get QEMU's)."""

    id: str  # qdev id
    path: str
    format: str = "qcow2"
    bus: str = "virtio"  # virtio, scsi (scsi-hd), ide (ide-hd), cdrom (ide-cd)
    protocol: str = "file"  # file or host_device
    file_opts: Mapping[str, Any] = field(default_factory=dict)  # -blockdev options of the protocol node
    fmt_opts: Mapping[str, Any] = field(default_factory=dict)  # ... of the format node
    throttle_group: str | None = None  # a throttle filter node above the format node
    copy_on_read: bool = False  # a copy-on-read filter node above the format node (below the throttle)
    iothread: str | None = None
    legacy: str | None = None  # "-drive" options (if=none and id are added) instead of -blockdev nodes
    backing: str | None = None  # a qcow2 base image, as its own -blockdev nodes <id>-base-file/-fmt (libvirt's way)

    @property
    def read_only(self) -> bool:
        return bool(self.fmt_opts.get("read-only")) or self.bus == "cdrom"


@dataclass(frozen=True)
class VMConfig:
    name: str
    disks: tuple[Disk, ...]
    objects: tuple[Mapping[str, Any], ...] = ()  # -object (JSON form)
    runas: str | None = None
    backend_throttle: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # disk id -> limits
    block_device: bool = False  # disks and DEST are block devices (host_device)

    def args(self) -> list[str]:
        args: list[str] = []
        for obj in self.objects:
            args += ["-object", json.dumps(dict(obj))]
        if any(d.bus == "scsi" for d in self.disks):
            args += ["-device", "virtio-scsi-pci,id=scsi0"]
        ide_port = 0
        for disk in self.disks:
            if disk.legacy is not None:
                path = disk.path.replace(",", ",,")
                args += ["-drive", f"file={path},if=none,id={disk.id}-drive,format={disk.format},{disk.legacy}"]
                top = f"{disk.id}-drive"
            else:
                ro = {"read-only": True} if disk.read_only else {}
                backing: dict[str, Any] = {}
                if disk.backing is not None:
                    args += ["-blockdev", json.dumps({"driver": "file", "filename": disk.backing,
                                                      "node-name": f"{disk.id}-base-file", "read-only": True})]
                    args += ["-blockdev", json.dumps({"driver": "qcow2", "file": f"{disk.id}-base-file",
                                                      "node-name": f"{disk.id}-base-fmt", "read-only": True})]
                    backing = {"backing": f"{disk.id}-base-fmt"}
                args += ["-blockdev", json.dumps({"driver": disk.protocol, "filename": disk.path,
                                                  "node-name": f"{disk.id}-file", **ro, **disk.file_opts})]
                top = f"{disk.id}-file"
                if disk.format:  # (empty: the protocol node is the disk's image, with no format node)
                    args += ["-blockdev", json.dumps({"driver": disk.format, "file": f"{disk.id}-file",
                                                      "node-name": f"{disk.id}-fmt", **ro, **backing, **disk.fmt_opts})]
                    top = f"{disk.id}-fmt"
                if disk.copy_on_read:
                    args += ["-blockdev", json.dumps({"driver": "copy-on-read", "file": top,
                                                      "node-name": f"{disk.id}-cor"})]
                    top = f"{disk.id}-cor"
                if disk.throttle_group:
                    args += ["-blockdev", json.dumps({"driver": "throttle", "throttle-group": disk.throttle_group,
                                                      "file": top, "node-name": f"{disk.id}-throttle"})]
                    top = f"{disk.id}-throttle"
            if disk.bus == "virtio":
                dev = f"virtio-blk-pci,drive={top},id={disk.id}"
                if disk.iothread:
                    dev += f",iothread={disk.iothread}"
            elif disk.bus == "scsi":
                dev = f"scsi-hd,drive={top},id={disk.id},bus=scsi0.0"
            elif disk.bus in ("ide", "cdrom"):
                kind = "ide-hd" if disk.bus == "ide" else "ide-cd"
                dev = f"{kind},drive={top},id={disk.id},bus=ide.{ide_port}"
                ide_port += 1
            else:
                raise ValueError(f"unknown bus {disk.bus}")
            args += ["-device", dev]
        if self.runas:
            args += ["-runas", self.runas]
        return args


class ConfigVM(ScratchVM):
    """A ScratchVM started from a :class:`VMConfig` (all disks come from the config's arguments)."""

    def __init__(self, workdir: Path, config: VMConfig, *, accel: str) -> None:
        self.config = config
        super().__init__(workdir, [], name=config.name, accel=accel, extra_args=config.args())
        for disk_id, limits in config.backend_throttle.items():
            full = {k: 0 for k in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")}
            self.cmd("block_set_io_throttle", id=disk_id, **{**full, **limits})

    def block_entry(self, disk_id: str) -> dict[str, Any]:
        """The disk's query-block entry, whatever its device type calls it."""
        for entry in self.cmd("query-block"):
            qdev = str(entry.get("qdev") or "")
            if qdev == disk_id or qdev.startswith(f"/machine/peripheral/{disk_id}/") \
                    or entry.get("device") == f"{disk_id}-drive":
                return dict(entry)
        raise KeyError(disk_id)

    def backend(self, disk_id: str) -> str:
        """What HMP ``qemu-io -d`` takes for this disk: query-block's qdev path (virtio: ``/machine/
        peripheral/ID/virtio-backend``; scsi-hd, ide-hd, ide-cd: the bare ``ID``)."""
        return str(self.block_entry(disk_id)["qdev"])

    def hmp_many(self, lines: list[str]) -> list[str]:
        """HMP commands sent back to back (QMP pipelines them; QEMU answers in order): no round trip each."""
        client = self.aux._client

        async def send() -> list[Any]:
            return list(await asyncio.gather(*(client.execute("human-monitor-command", {"command-line": line})
                                               for line in lines)))

        return [str(out) for out in self.aux._call(send())]

    def io(self, disk_id: str, line: str) -> str:
        escaped = line.replace('"', '\\"')
        return self.hmp(f'qemu-io -d {self.backend(disk_id)} "{escaped}"')

    def tree(self, disk_id: str, *, argv: bool = True) -> nodes.NodeTree:
        hints = None
        if argv:  # what blockcopy would do: QEMU's command line through the QMP socket's peer pid
            line = nodes.qemu_argv(str(self.qmp_socket))
            assert line is not None and line[0].endswith(self.args[0]), line
            hints = nodes.options_from_argv(line)
        return nodes.node_tree(self.block_entry(disk_id), self.cmd("query-named-block-nodes", flat=True),
                               self.cmd("x-debug-query-block-graph"), argv=hints)

    def node(self, name: str) -> dict[str, Any]:
        for n in self.cmd("query-named-block-nodes", flat=True):
            if n.get("node-name") == name:
                return dict(n)
        raise KeyError(name)

    def open_files(self) -> dict[str, int]:
        """{path: open flags} of the files and block devices QEMU holds (from /proc)."""
        out = {}
        base = f"/proc/{self.process.pid}"
        for fd in os.listdir(f"{base}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"{base}/fd/{fd}")
                if target.startswith("/") and not target.startswith("/dev/kvm"):
                    info = Path(f"{base}/fdinfo/{fd}").read_text()
                    flags = next(line for line in info.splitlines() if line.startswith("flags:"))
                    out[target] = int(flags.split()[1], 8)
        return out

    def uid(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[2])


# --- what a configuration needs on the host -----------------------------------------------------

def ensure_user(name: str = RUNAS_USER) -> tuple[int, int]:
    """(uid, gid) of a system user for ``-runas``, created when missing."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def device_mapper_available() -> bool:
    """LVM needs the kernel's device-mapper (absent on some build hosts and containers)."""
    if shutil.which("dmsetup") is None:
        return False
    return subprocess.run(["dmsetup", "version"], capture_output=True, check=False).returncode == 0


def ensure_lvm() -> None:
    if shutil.which("lvcreate") is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "lvm2"], check=True,
                       capture_output=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


class Lab:
    """Creates images, directories, block devices and VMs for one test; ``close()`` undoes everything."""

    def __init__(self, workdir: Path, accel: str) -> None:
        self.workdir = workdir
        self.accel = accel
        self.vms: list[ConfigVM] = []
        self._undo: list[tuple[str, Callable[[], Any]]] = []
        self.cleanup_errors: list[str] = []

    def on_close(self, what: str, action: Callable[[], Any]) -> None:
        self._undo.append((what, action))

    def close(self) -> None:
        for vm in self.vms:
            with contextlib.suppress(Exception):
                vm.kill()
        while self._undo:
            what, action = self._undo.pop()
            try:
                action()
            except Exception as exc:  # go on: the other resources still get released
                self.cleanup_errors.append(f"{what}: {exc}")

    # directories and images

    def shared_dir(self) -> Path:
        """A directory an unprivileged QEMU can reach (pytest's tmp_path is 0700 root)."""
        path = Path(tempfile.mkdtemp(prefix="bc-runas-", dir="/var/tmp"))
        path.chmod(0o755)
        self.on_close(f"rm -r {path}", lambda: shutil.rmtree(path))
        return path

    def image(self, name: str, *, size: int = 64 * MIB, fmt: str = "qcow2", where: Path | None = None,
              owner: str | None = None, fill: int | None = FILL) -> str:
        path = make_image((where or self.workdir) / name, size, fmt)
        if fill is not None:
            fill_pattern(path, fmt, fill, 0, 4 * MIB)
        if owner:
            uid, gid = ensure_user(owner)
            os.chown(path, uid, gid)
        return str(path)

    def loop_device(self, size: int = 64 * MIB, *, fill: int | None = FILL) -> str:
        backing = self.workdir / f"loop{len(self._undo)}.img"
        with open(backing, "wb") as f:
            f.truncate(size)
        if fill is not None:
            fill_pattern(backing, "raw", fill, 0, 4 * MIB)
        dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True, capture_output=True,
                             text=True).stdout.strip()
        self.on_close(f"losetup -d {dev}", lambda: subprocess.run(["losetup", "-d", dev], check=True))
        return dev

    def volume_group(self, size: int = 256 * MIB) -> str:
        """A volume group on a loop device; removed (with its volumes) at close."""
        ensure_lvm()
        if not device_mapper_available():
            raise LvmUnavailable("the kernel has no device-mapper (dmsetup version fails): LVM cannot work here")
        pv = self.loop_device(size, fill=None)
        vg = f"bcvg{os.getpid()}x{len(self._undo)}"
        quiet = ["-q", "-y"]
        subprocess.run(["pvcreate", *quiet, pv], check=True, capture_output=True)
        self.on_close(f"pvremove {pv}", lambda: subprocess.run(["pvremove", *quiet, pv], check=True,
                                                               capture_output=True))
        subprocess.run(["vgcreate", *quiet, vg, pv], check=True, capture_output=True)
        self.on_close(f"vgremove {vg}", lambda: subprocess.run(["vgremove", "-f", *quiet, vg], check=True,
                                                               capture_output=True))
        return vg

    def logical_volume(self, vg: str, name: str, size: int = 64 * MIB, *, fill: int | None = FILL) -> str:
        subprocess.run(["lvcreate", "-q", "-y", "-W", "y", "-L", f"{size // MIB}M", "-n", name, vg], check=True,
                       capture_output=True)
        dev = f"/dev/{vg}/{name}"
        self.on_close(f"lvremove {dev}", lambda: subprocess.run(["lvremove", "-f", "-q", "-y", f"{vg}/{name}"],
                                                                check=True, capture_output=True))
        if fill is not None:
            fill_pattern(Path(dev), "raw", fill, 0, 4 * MIB)
        return dev

    # VMs

    def start(self, config: VMConfig, *, workdir: Path | None = None) -> ConfigVM:
        vm = ConfigVM(workdir or self.workdir, config, accel=self.accel)
        self.vms.append(vm)
        return vm

    def dest_for(self, vm: ConfigVM, disk: Disk) -> str:
        """A DEST for ``disk``: a fresh image of the same format and size beside it (owned like it), or
        another block device of the same size."""
        size = vm.tree(disk.id).virtual_size
        if vm.config.block_device:
            return self.block_dest(disk, size)
        where = Path(disk.path).parent
        dest = str(where / f"dest-{Path(disk.path).name}")
        make_image(Path(dest), size, disk.format)
        st = os.stat(disk.path)
        os.chown(dest, st.st_uid, st.st_gid)
        os.chmod(dest, st.st_mode & 0o7777)
        return dest

    def block_dest(self, disk: Disk, size: int) -> str:
        if disk.path.startswith("/dev/loop"):
            return self.loop_device(size, fill=None)
        vg = disk.path.split("/")[2]
        return self.logical_volume(vg, f"dest{len(self._undo)}", size, fill=None)


class LvmUnavailable(RuntimeError):
    pass


# --- QMP-level pivot and measurement ------------------------------------------------------------

def wait_job(vm: ScratchVM, job: str, status: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        jobs = {j["id"]: j for j in vm.cmd("query-jobs")}
        if jobs[job]["status"] == status:
            return
        if jobs[job]["status"] == "concluded" or time.monotonic() > deadline:
            raise AssertionError(f"job {job}: {jobs[job]} (waiting for {status})")
        time.sleep(0.02)


@dataclass(frozen=True)
class Pivot:
    before: nodes.NodeTree
    after: nodes.NodeTree
    dest_args: dict[str, Any]
    mirror_args: dict[str, Any]


def pivot(vm: ConfigVM, disk_id: str, dest: str, *, dest_format: str | None = None, is_block_device: bool = False,
          overrides: Mapping[str, Any] | None = None, use_replaces: bool = True, tag: str = "d") -> Pivot:
    """Copy ``disk_id`` to ``dest`` and switch the device to it, with plain QMP (not blockcopy's driver):
    blockdev-add (nodes.dest_blockdev_args), blockdev-mirror (nodes.mirror_target_args), job-complete,
    job-finalize, job-dismiss; the old nodes stay open (blockdev-del is the caller's business)."""
    before = vm.tree(disk_id)
    fmt = dest_format or before.image_format
    dest_args = nodes.dest_blockdev_args(before, dest, fmt, f"{tag}-{disk_id}-fmt", f"{tag}-{disk_id}-file",
                                         is_block_device=is_block_device, overrides=overrides,
                                         **({"backing": None} if fmt == "qcow2" else {}))
    vm.cmd("blockdev-add", **dest_args)
    target = nodes.mirror_target_args(before)
    if not use_replaces:
        target.pop("replaces", None)
    job = f"{tag}-{disk_id}-job"
    mirror_args = {"job-id": job, "target": dest_args["node-name"], "sync": "full", "auto-finalize": False,
                   "auto-dismiss": False, **target}
    vm.cmd("blockdev-mirror", **mirror_args)
    wait_job(vm, job, "ready")
    vm.cmd("job-complete", id=job)
    wait_job(vm, job, "pending")
    vm.cmd("job-finalize", id=job)
    wait_job(vm, job, "concluded")
    error = next(j for j in vm.cmd("query-jobs") if j["id"] == job).get("error")
    vm.cmd("job-dismiss", id=job)
    if error:
        raise AssertionError(f"mirror {job} failed: {error}")
    return Pivot(before, vm.tree(disk_id), dest_args, mirror_args)


@dataclass(frozen=True)
class Rate:
    iops: float
    bps: float
    ops: int
    seconds: float
    lower_bound: bool = False  # all writes completed too fast to fit a slope: the rate is at least this


def write_rate(vm: ConfigVM, disk_id: str, *, count: int = 250, size: int = 4096, offset: int = 8 * MIB) -> Rate:
    """IOPS and bytes/s that ``count`` queued guest-like writes of ``size`` bytes achieve through the device.

    The writes are queued at once with pipelined HMP ``qemu-io -d <qdev> "aio_write ..."`` (no ``aio_flush``:
    QEMU's drain, which it uses, lifts I/O limits while it runs), and their completions are read from
    ``query-blockstats`` (the device's ``wr_operations``, counted as each write completes). The rate is
    the least-squares slope of completions over time once every write is queued (the HMP commands
    themselves load QEMU's main loop, where the throttle timers run) and before the last 5%; each
    sample is timed at the middle of its QMP round trip.
    """
    qdev = vm.backend(disk_id)

    def completed() -> tuple[float, int]:
        sent = time.monotonic()
        stats = vm.cmd("query-blockstats")
        at = (sent + time.monotonic()) / 2
        for entry in stats:
            if entry.get("qdev") == qdev:
                return at, int(entry["stats"]["wr_operations"])
        raise KeyError(qdev)

    base = completed()[1]
    started = time.monotonic()
    backend = vm.backend(disk_id)
    outs = vm.hmp_many([f'qemu-io -d {backend} "aio_write -P 0x5a {offset + i * size} {size}"'
                        for i in range(count)])
    if any(out.strip() for out in outs):
        raise AssertionError(f"aio_write: {[o for o in outs if o.strip()][:3]}")
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + 120
    while True:
        at, done = completed()
        done -= base
        if done >= count:
            break
        if done <= count * 0.95:
            samples.append((at, done))
        if time.monotonic() > deadline:
            raise AssertionError(f"only {done} of {count} writes completed")
        time.sleep(0.05)
    if len(samples) < 10 or samples[-1][0] - samples[0][0] < 1.0:
        # Done before a rate could be fitted: far faster than any limit here. A lower bound is enough.
        elapsed = time.monotonic() - started
        return Rate(iops=count / elapsed, bps=count * size / elapsed, ops=count, seconds=elapsed, lower_bound=True)
    mean_t = sum(t for t, _ in samples) / len(samples)
    mean_n = sum(n for _, n in samples) / len(samples)
    iops = sum((t - mean_t) * (n - mean_n) for t, n in samples) / sum((t - mean_t) ** 2 for t, _ in samples)
    return Rate(iops=iops, bps=iops * size, ops=samples[-1][1] - samples[0][1],
                seconds=samples[-1][0] - samples[0][0])


# --- the configurations -------------------------------------------------------------------------

def virtio_iothread(lab: Lab) -> VMConfig:
    return VMConfig("iothread", (Disk("vda", lab.image("vda.qcow2"), iothread="io0"),),
                    objects=({"qom-type": "iothread", "id": "io0"},))


def scsi_hd(lab: Lab) -> VMConfig:
    return VMConfig("scsi", (Disk("sda", lab.image("sda.qcow2"), bus="scsi"),))


def ide_hd(lab: Lab) -> VMConfig:
    return VMConfig("ide", (Disk("hda", lab.image("hda.qcow2"), bus="ide"),))


def legacy_drive(lab: Lab) -> VMConfig:
    """-drive if=none + -device, with cache=none, aio=native and discard=unmap on the -drive."""
    return VMConfig("drive", (Disk("vda", lab.image("vda.qcow2"),
                                   legacy="cache=none,aio=native,discard=unmap,detect-zeroes=unmap"),))


LIBVIRT_FILE_OPTS = {"cache": {"direct": True, "no-flush": False}, "aio": "native", "discard": "unmap",
                     "detect-zeroes": "unmap", "auto-read-only": True}
LIBVIRT_FMT_OPTS = {"cache": {"direct": True, "no-flush": False}, "discard": "unmap", "detect-zeroes": "unmap"}


def direct_native(lab: Lab) -> VMConfig:
    """libvirt-style -blockdev file + qcow2 nodes: cache.direct=on, aio=native, discard and detect-zeroes unmap."""
    return VMConfig("direct", (Disk("vda", lab.image("vda.qcow2"), file_opts=LIBVIRT_FILE_OPTS,
                                    fmt_opts=LIBVIRT_FMT_OPTS),))


THROTTLE_IOPS = 50


def throttle_filter(lab: Lab) -> VMConfig:
    """A throttle filter node (group tg0, 50 IOPS) above qcow2 above file."""
    return VMConfig("throttle", (Disk("vda", lab.image("vda.qcow2"), throttle_group="tg0"),),
                    objects=({"qom-type": "throttle-group", "id": "tg0", "limits": {"iops-total": THROTTLE_IOPS}},))


def stacked_filters(lab: Lab) -> VMConfig:
    """Two filters above the image: throttle over copy-on-read over qcow2 (with cache.direct=on)."""
    return VMConfig("stacked", (Disk("vda", lab.image("vda.qcow2"), throttle_group="tg1", copy_on_read=True,
                                     file_opts={"cache": {"direct": True}}, fmt_opts={"cache": {"direct": True}}),),
                    objects=({"qom-type": "throttle-group", "id": "tg1", "limits": {"bps-total": 64 * MIB}},))


BACKEND_BPS = 2 * MIB


def backend_throttle(lab: Lab) -> VMConfig:
    """BlockBackend throttling set with block_set_io_throttle (2 MiB/s) on an ide-hd."""
    return VMConfig("bbthrottle", (Disk("hda", lab.image("hda.qcow2"), bus="ide"),),
                    backend_throttle={"hda": {"bps": BACKEND_BPS}})


def read_only(lab: Lab) -> VMConfig:
    """A read-only=on virtio disk and an ide-cd CD-ROM with a raw image."""
    return VMConfig("ro", (Disk("vda", lab.image("vda.qcow2"), fmt_opts={"read-only": True}),
                           Disk("cd0", lab.image("cd0.iso", size=8 * MIB, fmt="raw"), format="raw", bus="cdrom")))


def runas(lab: Lab) -> VMConfig:
    """QEMU run with -runas bcqemu; its image (0600, owned by bcqemu) in a directory it can reach."""
    where = lab.shared_dir()
    return VMConfig("runas", (Disk("vda", lab.image("vda.qcow2", where=where, owner=RUNAS_USER)),),
                    runas=RUNAS_USER)


def loop_raw(lab: Lab) -> VMConfig:
    """A raw disk on a loop device (host_device); DEST is another loop device."""
    return VMConfig("loop", (Disk("vda", lab.loop_device(), format="raw", protocol="host_device"),),
                    block_device=True)


def lvm_raw(lab: Lab) -> VMConfig:
    """A raw disk on an LVM logical volume on a loop device; DEST is another LV of the same group."""
    vg = lab.volume_group()
    return VMConfig("lvm", (Disk("vda", lab.logical_volume(vg, "src"), format="raw", protocol="host_device"),),
                    block_device=True)


def production_pair(lab: Lab) -> VMConfig:
    """Two disks as production VMs have them: libvirt-style cache.direct=on + aio=native nodes under a
    throttle filter each (one group), on virtio-blk with an iothread."""
    group = {"qom-type": "throttle-group", "id": "tgp", "limits": {"iops-total": 2000, "bps-total": 512 * MIB}}
    return VMConfig("pair", tuple(Disk(name, lab.image(f"{name}.qcow2", size=16 * MIB), file_opts=LIBVIRT_FILE_OPTS,
                                       fmt_opts=LIBVIRT_FMT_OPTS, throttle_group="tgp", iothread="iop")
                                  for name in ("vda", "vdb")),
                    objects=({"qom-type": "iothread", "id": "iop"}, group))


def libvirt_threads(lab: Lab) -> VMConfig:
    """libvirt 9.0's own `cache='none'` disk (cache.direct=on, aio left to QEMU: threads), discard and
    detect-zeroes unmap, under a throttle group, on virtio-blk with an iothread: the DEST of such a
    disk is O_DIRECT from the start, or with --page-cache-fill filled through the page cache, then
    reopened O_DIRECT on the iothread."""
    file_opts = {k: v for k, v in LIBVIRT_FILE_OPTS.items() if k != "aio"}
    group = {"qom-type": "throttle-group", "id": "tgl", "limits": {"iops-total": 4000, "bps-total": 512 * MIB}}
    return VMConfig("libvirt", (Disk("vda", lab.image("vda.qcow2"), file_opts=file_opts, fmt_opts=LIBVIRT_FMT_OPTS,
                                     throttle_group="tgl", iothread="iol"),),
                    objects=({"qom-type": "iothread", "id": "iol"}, group))


CONFIGS: dict[str, Callable[[Lab], VMConfig]] = {
    "production-pair": production_pair,
    "libvirt-threads": libvirt_threads,
    "virtio-iothread": virtio_iothread,
    "scsi-hd": scsi_hd,
    "ide-hd": ide_hd,
    "legacy-drive": legacy_drive,
    "direct-native": direct_native,
    "throttle-filter": throttle_filter,
    "stacked-filters": stacked_filters,
    "backend-throttle": backend_throttle,
    "read-only": read_only,
    "runas": runas,
    "loop-raw": loop_raw,
    "lvm-raw": lvm_raw,
}


def has_pattern(path: str, fmt: str, pattern: int, offset: int, length: int) -> bool:
    """True when the guest-visible bytes of an image (file or block device) hold ``pattern``; no locks."""
    proto = "host_device" if stat.S_ISBLK(os.stat(path).st_mode) else "file"
    opts = f"driver={fmt},file.driver={proto},file.filename={path.replace(',', ',,')},file.locking=off"
    proc = subprocess.run(["qemu-io", "-r", "--image-opts", opts, "-c", f"read -P {pattern:#x} {offset} {length}"],
                          capture_output=True, text=True, check=False)
    return proc.returncode == 0 and "Pattern verification failed" not in proc.stdout and "read " in proc.stdout
