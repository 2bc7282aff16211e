"""Image files: create destinations safely, read their metadata, compare guest-visible content.

All through ``qemu-img`` with argument lists. Images that a running QEMU holds are read with
``file.locking=off`` image options (``-U`` is refused on a mirror target's "consistent read" lock).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from blockcopy.errors import BlockcopyError

QEMU_IMG = "qemu-img"


class ImageError(BlockcopyError):
    """qemu-img failed, or an image is not what it must be."""


@dataclass(frozen=True)
class ImageInfo:
    path: str
    format: str
    virtual_size: int
    backing_file: str | None


def image_opts(path: str, fmt: str) -> str:
    """An --image-opts string that reads ``path`` without taking QEMU's image locks."""
    escaped = path.replace(",", ",,")
    return f"driver={fmt},file.driver=file,file.filename={escaped},file.locking=off"


def _run(args: list[str], *, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise ImageError(f"{args[0]} not found: install Debian's qemu-utils package") from None


def info(path: str) -> ImageInfo:
    """Metadata of an image, readable even while QEMU holds it (force-share)."""
    proc = _run([QEMU_IMG, "info", "--output=json", "-U", path])
    if proc.returncode != 0:
        raise ImageError(f"cannot read image {path}: {proc.stderr.strip()}")
    data = json.loads(proc.stdout)
    return ImageInfo(path, str(data["format"]), int(data["virtual-size"]), data.get("full-backing-filename"))


def create(path: str, fmt: str, size: int, *, backing_file: str | None = None,
           backing_format: str | None = None) -> None:
    """Create a new image at ``path``; never overwrites: the file is made with O_CREAT|O_EXCL first."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    try:
        if fmt == "raw":
            os.ftruncate(fd, size)
            os.fsync(fd)
            return
    finally:
        os.close(fd)
    args = [QEMU_IMG, "create", "-q", "-f", fmt]
    if backing_file is not None:
        args += ["-b", backing_file, "-F", backing_format or "qcow2"]
    # The file is ours (created exclusively just now), so qemu-img may write it.
    args += [path, str(size)]
    proc = _run(args)
    if proc.returncode != 0:
        Path(path).unlink(missing_ok=True)
        raise ImageError(f"cannot create {path}: {proc.stderr.strip()}")


def compare(path_a: str, fmt_a: str, path_b: str, fmt_b: str) -> bool:
    """True when both images hold the same guest-visible data. Raises when either is unreadable."""
    proc = _run([QEMU_IMG, "compare", "-q", "--image-opts", image_opts(path_a, fmt_a),
                 image_opts(path_b, fmt_b)])
    if proc.returncode in (0, 1):
        return proc.returncode == 0
    raise ImageError(f"cannot compare {path_a} and {path_b}: {proc.stderr.strip()}")


def check(path: str, fmt: str) -> tuple[bool, str]:
    """qemu-img check (consistency of image metadata); raw images have nothing to check."""
    if fmt == "raw":
        return True, ""
    proc = _run([QEMU_IMG, "check", "--image-opts", image_opts(path, fmt)])
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()
