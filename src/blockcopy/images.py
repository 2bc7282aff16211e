"""Image files: create destinations safely, read their metadata, compare guest-visible content.

All through ``qemu-img`` with argument lists. Images that a running QEMU holds are read with
``file.locking=off`` image options (``-U`` is refused on a mirror target's "consistent read" lock).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from blockcopy import faults
from blockcopy.errors import BlockcopyError

QEMU_IMG = "qemu-img"


class ImageError(BlockcopyError):
    """qemu-img failed, or an image is not what it must be."""


@dataclass(frozen=True)
class ImageInfo:
    path: str
    format: str
    virtual_size: int
    backing_file: str | None  # as QEMU resolves it (full-backing-filename)
    backing_format: str | None = None
    data_file: str | None = None  # a qcow2 image's external data file, as its header names it


def image_opts(path: str, fmt: str, *, size: int | None = None) -> str:
    """An --image-opts string that reads ``path`` without taking QEMU's image locks (protocol
    ``host_device`` for a block device: QEMU 7.2's ``file`` refuses one). ``size``: a raw image's
    first bytes only (a disk on a larger block device)."""
    escaped = path.replace(",", ",,")
    limit = f",size={size}" if size is not None and fmt == "raw" else ""
    return f"driver={fmt}{limit},file.driver={_protocol(path)},file.filename={escaped},file.locking=off"


def _protocol(path: str) -> str:
    """QEMU's protocol driver for ``path``: ``host_device`` for a block device (QEMU 7.2's ``file``
    refuses one), else ``file``."""
    try:
        return "host_device" if stat.S_ISBLK(os.stat(path).st_mode) else "file"
    except OSError:
        return "file"  # (qemu-img then says why it cannot open it)


def _run(args: list[str], *, timeout: float = 600.0,
         pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, pass_fds=pass_fds)
    except FileNotFoundError:
        raise ImageError(f"{args[0]} not found: install Debian's qemu-utils package") from None


def info(path: str, fmt: str | None = None) -> ImageInfo:
    """Metadata of an image, readable even while QEMU holds it (force-share).

    Give ``fmt`` whenever the format is known: probing a raw image whose guest wrote a qcow2 header
    into it would read the guest's header (and follow a backing file the guest chose).
    """
    args = [QEMU_IMG, "info", "--output=json", "-U"]
    if fmt is not None:
        args += ["-f", fmt]
    proc = _run([*args, path])
    if proc.returncode != 0:
        raise ImageError(f"cannot read image {path}: {proc.stderr.strip()}")
    data = json.loads(proc.stdout)
    specific = (data.get("format-specific") or {}).get("data") or {}
    return ImageInfo(path, str(data["format"]), int(data["virtual-size"]), data.get("full-backing-filename"),
                     data.get("backing-filename-format"), specific.get("data-file"))


def own_layer_allocated(path: str) -> bool:
    """Whether a qcow2 image holds any cluster of its own (data, or zeroes that hide its backing
    file), read without opening its backing file. A shallow mirror (QEMU 7.2: ``sync: top``) does
    not clear its target first: whatever the target's own layer holds where the source's top layer
    holds nothing stays visible to the guest after the pivot."""
    spec = {"driver": "qcow2", "backing": None, "file": {"driver": _protocol(path), "filename": path, "locking": "off"}}
    proc = _run([QEMU_IMG, "map", "--output=json", "json:" + json.dumps(spec)])
    if proc.returncode != 0:
        raise ImageError(f"cannot read the allocation of {path}: {proc.stderr.strip()}")
    return any(extent.get("present") for extent in json.loads(proc.stdout))


def open_identified(path: str, identity: tuple[int, int]) -> int:
    """Open an image read-write, only if ``path`` still names the file whose (st_dev, st_ino) is
    ``identity``: no symlink is followed, a FIFO does not block, and the check is on the opened
    descriptor, so nothing can be swapped in between the check and the use.

    A block device is opened ``O_EXCL``: the kernel's exclusive claim belongs to this open file,
    which every open QEMU makes of the fd set duplicates, so while QEMU holds DEST nobody can mount
    it, assemble it into md or dm, or claim it otherwise.

    :raise ImageError: the path names another file, or none, or the device is held by someone.
    """
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
    try:
        if stat.S_ISBLK(os.lstat(path).st_mode):
            flags |= os.O_EXCL
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise ImageError(f"block device {path} is in use (mounted, or held by device-mapper, md or another "
                             "exclusive user); refusing to write to it") from None
        raise ImageError(f"cannot open {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != identity or not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        os.close(fd)
        raise ImageError(f"{path} is not the file blockcopy checked or created (it was replaced); "
                         "refusing to open it")
    os.set_blocking(fd, True)
    return fd


def open_to_sync(path: str) -> int:
    """A read-only descriptor of ``path`` for an fsync: never through a symlink, and never blocking
    on a FIFO swapped in for an image (an open for reading would wait for a writer). The caller
    checks the file type on the descriptor and closes it.

    :raise OSError: as ``os.open``.
    """
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)


def locked_by(path: str, fmt: str) -> str | None:
    """Why an image is in use by another process (a QEMU holding its image locks), or None."""
    proc = _run([QEMU_IMG, "info", "--output=json", "-f", fmt, path])
    if proc.returncode == 0:
        return None
    message = proc.stderr.strip()
    return message if "lock" in message.lower() else None


def create(path: str, fmt: str, size: int, *, tag: str, backing_file: str | None = None,
           backing_format: str | None = None, mode: int = 0o600, owner: tuple[int, int] | None = None,
           cluster_size: int | None = None, preallocation: str | None = None,
           directory_identity: tuple[int, int] | None = None,
           before_link: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Make a new image and give it the name ``path``, which must not exist; returns (st_dev, st_ino).

    Nothing is ever opened by ``path``, so a symlink or file swapped in there by someone who can
    write the directory is neither followed nor overwritten: the image is made in a file without a
    name (O_TMPFILE; on file systems without it, a name derived from ``tag`` created with
    O_EXCL|O_NOFOLLOW), ``qemu-img`` writes it through ``/dev/fd``, ``before_link`` is told its
    identity (to journal it), and it is linked into place with link(2), which never replaces a file.
    ``directory_identity``: the directory must still be the one checked when the job was planned
    (not a symlink or another directory swapped in for it since).

    :raise ImageError: the directory was replaced, ``path`` appeared meanwhile, or qemu-img failed.
    """
    directory, name = os.path.split(path)
    dir_fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    temp_name: str | None = None
    try:
        st_dir = os.fstat(dir_fd)
        if directory_identity is not None and (st_dir.st_dev, st_dir.st_ino) != directory_identity:
            raise ImageError(f"the directory {directory} is not the one checked when the copy was planned "
                             "(replaced, or a symlink swapped in); nothing was created there")
        try:
            if faults.fails("o-tmpfile"):
                raise OSError(errno.EOPNOTSUPP, "O_TMPFILE unsupported (test)")
            fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, mode, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            temp_name = temp_name_for(name, tag)
            with contextlib.suppress(FileNotFoundError):  # left by a crash: the name is this job's own
                os.unlink(temp_name, dir_fd=dir_fd)
            fd = os.open(temp_name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                         dir_fd=dir_fd)
        try:
            if owner is not None:
                os.fchown(fd, *owner)  # a QEMU running as its own user opens DEST again after a restart
            os.fchmod(fd, mode)  # whatever the umask
            _make_image(fd, path, fmt, size, backing_file, backing_format, cluster_size, preallocation)
            os.fsync(fd)
            st = os.fstat(fd)
            if before_link is not None:
                before_link(st.st_dev, st.st_ino)
            try:
                os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
            except FileExistsError:
                raise ImageError(f"{path} appeared while blockcopy was making it; it was left untouched") from None
            os.fsync(dir_fd)
            return st.st_dev, st.st_ino
        finally:
            os.close(fd)
            if temp_name is not None:  # removing a name never writes a file, whatever it names now
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp_name, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def temp_name_for(name: str, tag: str) -> str:
    """The name a job makes DEST under where the file system has no O_TMPFILE."""
    return f".{name}.blockcopy-{tag}"


def forget_temp_name(path: str, tag: str, identity: tuple[int, int]) -> None:
    """Remove the job's temporary name of DEST, left when a crash fell between link and unlink (it
    would keep DEST's data alive after DEST is deleted); only if it is that very file."""
    directory, name = os.path.split(path)
    try:
        dir_fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        temp = temp_name_for(name, tag)
        with contextlib.suppress(OSError):
            st = os.stat(temp, dir_fd=dir_fd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == identity:
                os.unlink(temp, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def _make_image(fd: int, path: str, fmt: str, size: int, backing_file: str | None,
                backing_format: str | None, cluster_size: int | None, preallocation: str | None) -> None:
    if fmt == "raw" and preallocation in (None, "off"):
        os.ftruncate(fd, size)  # sparse
        return
    args = [QEMU_IMG, "create", "-q", "-f", fmt]
    options = []
    if cluster_size and fmt == "qcow2":
        options.append(f"cluster_size={cluster_size}")
    if preallocation:
        options.append(f"preallocation={preallocation}")
    if options:
        args += ["-o", ",".join(options)]
    if backing_file is not None:
        args += ["-b", backing_file, "-F", backing_format or "qcow2"]
    # qemu-img writes the file blockcopy holds open (/dev/fd/N reopens that very file), never a path.
    proc = _run([*args, f"/dev/fd/{fd}", str(size)], pass_fds=(fd,))
    if proc.returncode != 0:
        raise ImageError(f"cannot create {path}: {proc.stderr.strip()}")


def compare(path_a: str, fmt_a: str, path_b: str, fmt_b: str, *, size: int | None = None) -> bool:
    """True when both images hold the same guest-visible data (``size``: the disk's, which a raw
    image on a larger block device holds in its first bytes). Raises when either is unreadable."""
    proc = _run([QEMU_IMG, "compare", "-q", "--image-opts", image_opts(path_a, fmt_a, size=size),
                 image_opts(path_b, fmt_b, size=size)])
    if proc.returncode in (0, 1):
        return proc.returncode == 0
    raise ImageError(f"cannot compare {path_a} and {path_b}: {proc.stderr.strip()}")


def check(path: str, fmt: str) -> tuple[bool, str]:
    """qemu-img check (consistency of image metadata); raw images have nothing to check."""
    if fmt == "raw":
        return True, ""
    proc = _run([QEMU_IMG, "check", "--image-opts", image_opts(path, fmt)])
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


# --- what storage a file or block device lives on (sysfs) -------------------------------------------

Storage = tuple[str, ...]  # ("block", sysfs dir) or ("file", st_dev, st_ino) as strings


def _sysfs_block(rdev: int) -> str | None:
    path = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    return os.path.realpath(path) if os.path.exists(path) else None


def _below_block(sysdir: str, out: set[Storage]) -> None:
    """A block device and everything its data lives on: the whole disk of a partition, the slaves of
    a device-mapper or md device, the file behind a loop device (and so on down)."""
    if ("block", sysdir) in out:
        return
    out.add(("block", sysdir))
    if os.path.exists(os.path.join(sysdir, "partition")):
        _below_block(os.path.dirname(sysdir), out)
    slaves = os.path.join(sysdir, "slaves")
    if os.path.isdir(slaves):
        for name in os.listdir(slaves):
            _below_block(os.path.realpath(os.path.join(slaves, name)), out)
    try:
        with open(os.path.join(sysdir, "loop", "backing_file")) as f:
            backing = f.read().strip()
    except OSError:
        return
    with contextlib.suppress(OSError):
        _below_path(backing, out)


def _below_path(path: str, out: set[Storage]) -> None:
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        sysdir = _sysfs_block(st.st_rdev)
        if sysdir is not None:
            _below_block(sysdir, out)
        return
    out.add(("file", str(st.st_dev), str(st.st_ino)))
    fs = _sysfs_block(st.st_dev)  # the file system's device
    if fs is not None:
        _below_block(fs, out)


def storage_of(path: str) -> tuple[Storage | None, set[Storage]]:
    """(what ``path`` is, everything its data lives on including itself); (None, empty) when unknown."""
    out: set[Storage] = set()
    try:
        st = os.stat(path)
        _below_path(path, out)
    except OSError:
        return None, set()
    if stat.S_ISBLK(st.st_mode):
        sysdir = _sysfs_block(st.st_rdev)
        return (("block", sysdir) if sysdir else None), out
    return ("file", str(st.st_dev), str(st.st_ino)), out


def overlaps(a: str, b: str) -> bool:
    """Whether writing ``a`` can change ``b``'s data or the other way round: one lives on the other
    (a partition and its disk, a device-mapper device and its slaves, a loop device and its file)."""
    a_is, a_below = storage_of(a)
    b_is, b_below = storage_of(b)
    return (a_is is not None and a_is in b_below) or (b_is is not None and b_is in a_below)

