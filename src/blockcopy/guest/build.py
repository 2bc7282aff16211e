"""Build (and cache) a tiny Linux guest that writes self-describing blocks to its virtio disks.

Parts, all from Debian packages, none installed on the host: the ``linux-image-*-cloud-amd64``
kernel (its virtio modules are loaded by our /init), ``busybox-static`` for /init, and
``writer.c`` compiled with ``gcc -static``. The initramfs is a cpio "newc" archive that this module
writes itself. The cache key covers the kernel package, writer.c and /init, so a change rebuilds.

Facts this relies on (Debian 12): VIRTIO, VIRTIO_PCI, VIRTIO_BLK are modules, uncompressed, with
no modules.dep; /init must mount devtmpfs; boot takes 2-3 s under TCG on 2 cores.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk")
WRITER_SOURCE = Path(__file__).with_name("writer.c")

INIT = """#!/bin/sh
B=/bin/busybox
$B mount -t devtmpfs devtmpfs /dev
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
for m in MODULES; do
    $B insmod /lib/modules/$m.ko || echo "bc-init: insmod $m failed"
done
args=""
disks=""
for word in $($B cat /proc/cmdline); do
    case "$word" in
        bc.args=*) args=$(echo "${word#bc.args=}" | $B tr ',' ' ') ;;
        bc.disks=*) disks=$(echo "${word#bc.disks=}" | $B tr ',' ' ') ;;
    esac
done
paths=""
for d in $disks; do
    n=0
    while [ ! -b /dev/$d ] && [ $n -lt 250 ]; do $B usleep 20000; n=$((n + 1)); done
    paths="$paths /dev/$d"
done
echo "bc-init: starting writer $args on$paths"
/writer $args $paths
echo "bc-init: writer exited with status $?"
$B poweroff -f
""".replace("MODULES", " ".join(MODULES))


class GuestBuildError(RuntimeError):
    """A part of the guest could not be fetched or built; the message says what to install."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path


def default_cache_dir() -> Path:
    env = os.environ.get("BLOCKCOPY_GUEST_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/blockcopy/guest")
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "blockcopy" / "guest"


def _run(args: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise GuestBuildError(f"{args[0]} not found; `make setup` installs what the guest build needs") from None
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def kernel_package() -> str:
    """The versioned kernel package that the cloud meta-package depends on."""
    try:
        out = _run(["apt-cache", "depends", KERNEL_META])
    except GuestBuildError:
        if os.geteuid() != 0:
            raise GuestBuildError(f"apt does not know {KERNEL_META}; run `apt-get update` as root") from None
        _run(["apt-get", "update", "-q"])  # a machine whose package lists were never fetched
        out = _run(["apt-cache", "depends", KERNEL_META])
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    raise GuestBuildError(f"cannot find the kernel package of {KERNEL_META}; run `apt-get update`")


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 0, rdev: tuple[int, int] = (0, 0)) -> bytes:
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    header = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
    out = header + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def write_cpio(path: Path, entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> None:
    """A cpio newc archive (what the kernel unpacks as an initramfs)."""
    blob = b"".join(_cpio_entry(name, mode, data, ino, rdev)
                    for ino, (name, mode, data, rdev) in enumerate(entries, start=1))
    blob += _cpio_entry("TRAILER!!!", 0)
    path.write_bytes(blob)


def build(cache_dir: Path | None = None, *, quiet: bool = True) -> GuestImage:
    """Return the cached guest, building it first if needed."""
    cache = cache_dir or default_cache_dir()
    package = kernel_package()
    key = hashlib.sha256((package + WRITER_SOURCE.read_text() + INIT).encode()).hexdigest()[:16]
    target = cache / key
    image = GuestImage(target / "vmlinuz", target / "initramfs.cpio")
    if image.kernel.exists() and image.initrd.exists():
        return image
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        work = Path(tmp)
        debs = cache / "debs"
        debs.mkdir(exist_ok=True)
        for name in (package, BUSYBOX):
            if not any(debs.glob(f"{name}_*.deb")):
                if not quiet:
                    print(f"fetching {name}", file=sys.stderr)
                _run(["apt-get", "download", "-q", name], cwd=debs)
        for deb in debs.glob("*.deb"):
            _run(["dpkg-deb", "-x", str(deb), str(work / "root")])
        root = work / "root"
        kernels = sorted(root.glob("boot/vmlinuz-*"))
        busybox = root / "bin" / "busybox"
        if not kernels or not busybox.exists():
            raise GuestBuildError("the kernel or busybox package did not contain what was expected")
        modules = {}
        for module in MODULES:
            found = list(root.glob(f"lib/modules/*/kernel/**/{module}.ko"))
            if not found:
                raise GuestBuildError(f"module {module}.ko not found in {package}")
            modules[module] = found[0].read_bytes()
        writer = work / "writer"
        _run(["gcc", "-static", "-O2", "-Wall", "-o", str(writer), str(WRITER_SOURCE)])
        entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
            ("bin", 0o040755, b"", (0, 0)), ("dev", 0o040755, b"", (0, 0)),
            ("dev/console", 0o020600, b"", (5, 1)), ("proc", 0o040755, b"", (0, 0)),
            ("sys", 0o040755, b"", (0, 0)), ("lib", 0o040755, b"", (0, 0)),
            ("lib/modules", 0o040755, b"", (0, 0)),
            ("bin/busybox", 0o100755, busybox.read_bytes(), (0, 0)),
            ("bin/sh", 0o120777, b"busybox", (0, 0)),
            ("init", 0o100755, INIT.encode(), (0, 0)),
            ("writer", 0o100755, writer.read_bytes(), (0, 0)),
        ]
        entries += [(f"lib/modules/{m}.ko", 0o100644, data, (0, 0)) for m, data in modules.items()]
        staged = work / "out"
        staged.mkdir()
        shutil.copyfile(kernels[-1], staged / "vmlinuz")
        write_cpio(staged / "initramfs.cpio", entries)
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    return image


def main() -> int:
    try:
        image = build(quiet=False)
    except GuestBuildError as exc:
        print(f"guest build: {exc}", file=sys.stderr)
        return 1
    print(f"guest kernel {image.kernel}\nguest initramfs {image.initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
