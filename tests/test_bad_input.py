"""Every bad input gets a clear error, a non-zero exit, and touches nothing."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest
from conftest import MIB, Blockcopy, node_names, qemu_jobs

from blockcopy.vm import DiskSpec, make_image


def _nothing_started(vm, bc: Blockcopy) -> None:
    assert qemu_jobs(vm) == []
    assert not any(n.startswith("bc-") for n in node_names(vm))
    assert bc.ok("jobs", "--json").json == []


def test_unknown_domain(attached, bc: Blockcopy, tmp_path: Path) -> None:
    attached(1)
    result = bc("copy", "nosuch", "vda", str(tmp_path / "d.qcow2"))
    assert result.returncode == 2
    assert "unknown domain 'nosuch'" in result.stderr and "blockcopy attach" in result.stderr
    assert not (tmp_path / "d.qcow2").exists()


def test_unknown_disk_lists_the_disks(attached, bc: Blockcopy, tmp_path: Path) -> None:
    vm = attached(1)
    result = bc("copy", "vm", "vdz", str(tmp_path / "d.qcow2"))
    assert result.returncode == 2
    assert "no disk 'vdz'" in result.stderr and "vda" in result.stderr
    assert not (tmp_path / "d.qcow2").exists()
    _nothing_started(vm, bc)


def test_disk_by_node_name(attached, bc: Blockcopy, tmp_path: Path) -> None:
    vm = attached(1)
    job = bc.ok("copy", "vm", "vda-fmt", str(tmp_path / "d.qcow2"), "--pivot", "--json").json
    assert job["outcome"] == "pivoted" and job["disk"] == "vda"
    assert vm.device_node("vda")[1] == str(tmp_path / "d.qcow2")


def test_unreachable_socket(bc: Blockcopy, tmp_path: Path) -> None:
    result = bc("attach", "vm", "--qmp", str(tmp_path / "missing.qmp"))
    assert result.returncode == 4
    assert "nothing listens" in result.stderr and "is the VM running" in result.stderr
    assert bc.ok("domains", "--json").json == []


def test_busy_socket_is_an_error_not_a_hang(vm_factory, bc: Blockcopy) -> None:
    vm = vm_factory(1)
    holder = socket.socket(socket.AF_UNIX)
    holder.connect(str(vm.qmp_socket))
    try:
        holder.recv(4096)  # QEMU greets the first client; blockcopy is the second
        result = bc("attach", "vm", "--qmp", str(vm.qmp_socket), timeout=60)
    finally:
        holder.close()
    assert result.returncode == 4
    assert "another client" in result.stderr


def test_existing_destination_is_never_overwritten(attached, bc: Blockcopy, tmp_path: Path) -> None:
    vm = attached(1)
    dest = tmp_path / "precious.img"
    dest.write_bytes(b"user data")
    result = bc("copy", "vm", "vda", str(dest))
    assert result.returncode == 2
    assert "already exists" in result.stderr and "--reuse-external" in result.stderr
    assert dest.read_bytes() == b"user data"
    _nothing_started(vm, bc)


@pytest.mark.parametrize("which", ["source", "backing", "symlink-to-source"])
def test_destination_is_the_source_or_its_backing(vm_factory, bc: Blockcopy, tmp_path: Path, which: str) -> None:
    base = make_image(tmp_path / "base.qcow2", 64 * MIB)
    top = make_image(tmp_path / "top.qcow2", 64 * MIB, backing=base)
    vm = vm_factory([DiskSpec("vda", str(top))])
    bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
    target = {"source": top, "backing": base, "symlink-to-source": tmp_path / "link.qcow2"}[which]
    if which == "symlink-to-source":
        os.symlink(top, target)
    before = (top.read_bytes(), base.read_bytes())
    result = bc("copy", "vm", "vda", str(target), "--reuse-external")
    assert result.returncode == 2
    assert ("the source image" in result.stderr) or ("backing chain" in result.stderr)
    assert (top.read_bytes(), base.read_bytes()) == before
    _nothing_started(vm, bc)


def test_relative_destination(attached, bc: Blockcopy) -> None:
    vm = attached(1)
    result = bc("copy", "vm", "vda", "relative.qcow2")
    assert result.returncode == 2 and "absolute path" in result.stderr
    _nothing_started(vm, bc)


def test_missing_directory(attached, bc: Blockcopy, tmp_path: Path) -> None:
    vm = attached(1)
    result = bc("copy", "vm", "vda", str(tmp_path / "no" / "such" / "d.qcow2"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    _nothing_started(vm, bc)


def test_unwritable_directory(attached, bc: Blockcopy, tmpfs) -> None:
    vm = attached(1)
    result = bc("copy", "vm", "vda", str(tmpfs("1m", readonly=True) / "d.qcow2"))
    assert result.returncode == 2 and "not writable" in result.stderr
    _nothing_started(vm, bc)


def test_reused_destination_too_small(attached, bc: Blockcopy, tmp_path: Path) -> None:
    vm = attached(1)
    dest = make_image(tmp_path / "small.qcow2", 32 * MIB)
    result = bc("copy", "vm", "vda", str(dest), "--reuse-external")
    assert result.returncode == 2
    assert "smaller than" in result.stderr and "sizes must match" in result.stderr
    _nothing_started(vm, bc)


def test_reused_destination_of_another_format(attached, bc: Blockcopy, tmp_path: Path) -> None:
    vm = attached(1)
    dest = make_image(tmp_path / "d.raw", 64 * MIB, fmt="raw")
    result = bc("copy", "vm", "vda", str(dest), "--reuse-external")
    assert result.returncode == 2
    assert "is a raw image, not qcow2" in result.stderr and "--format raw" in result.stderr
    _nothing_started(vm, bc)


def test_second_job_on_a_busy_disk(attached, bc: Blockcopy, tmp_path: Path) -> None:
    vm = attached(1)
    first = bc.ok("copy", "vm", "vda", str(tmp_path / "a.qcow2"), "--bandwidth", "1", "--json").json
    result = bc("copy", "vm", "vda", str(tmp_path / "b.qcow2"))
    assert result.returncode == 2
    assert f"already has block copy job {first['id']}" in result.stderr
    assert not (tmp_path / "b.qcow2").exists()
    assert len(qemu_jobs(vm)) == 1
    bc.ok("abort", first["id"])


def test_pivot_before_ready_says_how_far(attached, bc: Blockcopy, tmp_path: Path) -> None:
    vm = attached(1)
    job = bc.ok("copy", "vm", "vda", str(tmp_path / "a.qcow2"), "--bandwidth", "1", "--json").json
    result = bc("pivot", job["id"])
    assert result.returncode == 6
    assert "not ready to pivot" in result.stderr and "copied" in result.stderr and "MiB" in result.stderr
    assert "--wait" in result.stderr
    assert vm.device_node("vda")[1] == vm.disks[0].path
    assert vm.run_state() == "running"
    assert bc.ok("status", job["id"], "--json").json["state"] == "running"
    bc.ok("abort", job["id"])


def test_unknown_job(attached, bc: Blockcopy) -> None:
    attached(1)
    for command in ("status", "pivot", "abort", "finish"):
        result = bc(command, "feedbeef")
        assert result.returncode == 2 and "unknown job 'feedbeef'" in result.stderr


@pytest.mark.parametrize("value", ["0", "-5", "fast", "nan"])
def test_bandwidth_must_be_positive(bc: Blockcopy, tmp_path: Path, value: str) -> None:
    result = bc("copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--bandwidth", value)
    assert result.returncode == 2 and "MiB/s" in result.stderr


@pytest.mark.parametrize(("value", "message"), [("0", "size must be positive"), ("-1M", "size must be positive"),
                                              ("big", "is not a size"), ("2G", "between 1 byte and 1024 MiB")])
def test_buffer_size_must_be_a_sane_size(attached, bc: Blockcopy, tmp_path: Path, value: str, message: str) -> None:
    attached(1)
    result = bc("copy", "vm", "vda", str(tmp_path / "d.qcow2"), f"--buf-size={value}")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "d.qcow2").exists()


def test_auto_read_only_is_not_a_destination_option(attached, bc: Blockcopy, tmp_path: Path) -> None:
    attached(1)
    result = bc("copy", "vm", "vda", str(tmp_path / "d.qcow2"), "--dest-option", "auto-read-only=on")
    assert result.returncode == 2 and "auto-read-only does not apply" in result.stderr, result.stderr
    assert not (tmp_path / "d.qcow2").exists()


def test_domain_lock_refuses_a_second_blockcopy(attached, bc: Blockcopy, tmp_path: Path) -> None:
    attached(1)
    proc = bc.spawn("copy", "vm", "vda", str(tmp_path / "a.qcow2"), "--bandwidth", "2", "--wait")
    try:
        lock = bc.state_dir / "locks" / "vm.lock"
        ready = threading.Event()

        def watch() -> None:
            while proc.poll() is None and not (lock.exists() and lock.read_text().strip()):
                threading.Event().wait(0.05)
            ready.set()

        threading.Thread(target=watch, daemon=True).start()
        assert ready.wait(30)
        result = bc("disks", "vm")
        assert result.returncode == 5 and "is busy" in result.stderr and str(proc.pid) in result.stderr
    finally:
        proc.kill()
        proc.wait()


class _RunStates:
    """A monitor that answers only the two questions the migration check asks (pure logic: the
    states below that a real VM reaches are tested against QEMU in test_cli and test_nodes)."""

    def __init__(self, state: str, migration: str) -> None:
        self.state, self.migration = state, migration

    async def run_state(self) -> str:
        return self.state

    async def migration_status(self) -> str:
        return self.migration


@pytest.mark.parametrize(("state", "migration", "says"), [
    ("running", "none", None),
    ("running", "completed", None),  # (an incoming migration that ended here)
    ("running", "failed", None),
    ("paused", "cancelled", None),
    ("running", "active", ["is being migrated", "before or after the migration"]),
    ("paused", "setup", ["is being migrated"]),
    ("prelaunch", "active", ["is being migrated"]),
    ("finish-migrate", "device", ["is being migrated"]),
    ("inmigrate", "none", ["waits for an incoming migration", "once the migration has ended"]),
    ("postmigrate", "completed", ["was migrated away", "copy its disks there"]),
    ("postmigrate", "failed", ["stopped after a migration", "resume it (QMP `cont`"]),
    ("prelaunch", "none", ["stopped before its start", "-S", "reset while stopped", "resume it (QMP `cont`",
                           "qemu-img convert"]),
])
def test_each_migration_or_start_state_is_refused_with_what_it_is(state: str, migration: str,
                                                                   says: list[str] | None) -> None:
    import asyncio

    from blockcopy.errors import UsageError
    from blockcopy.manager import _refuse_migration

    if says is None:
        asyncio.run(_refuse_migration(_RunStates(state, migration), "vm"))  # type: ignore[arg-type]
        return
    with pytest.raises(UsageError) as refused:
        asyncio.run(_refuse_migration(_RunStates(state, migration), "vm"))  # type: ignore[arg-type]
    message = str(refused.value)
    assert f"run state {state}, migration {migration}" in message
    for text in says:
        assert text in message
    if "is being migrated" not in says:
        assert "being migrated" not in message


@pytest.mark.parametrize(("args", "message"), [
    (["--owner", "99999999999"], "owner ids must be between 0 and"),
    (["--owner", "4294967295"], "owner ids must be between 0 and"),  # (-1 to chown: "leave unchanged")
    (["--trailing-slash"], "names a directory"),
    (["--long-name"], "at most 255 bytes"),
], ids=["owner-overflow", "owner-minus-one", "dest-ending-in-a-slash", "dest-name-too-long"])
def test_bad_destination_settings_are_refused_before_anything_is_journaled(
        attached, bc: Blockcopy, tmp_path: Path, args: list[str], message: str) -> None:
    """Review 39: each of these passed planning. An owner id beyond 32 bits made os.fchown raise
    OverflowError after the job was journaled (a traceback, and every later command on the domain
    crashed the same way); 2**32 - 1 silently left the owner as it was; a DEST ending in '/' was a
    traceback; a file name longer than the file system takes failed only at link(2), exit 7."""
    vm = attached(1)
    dest = str(tmp_path / "d.qcow2")
    if args == ["--trailing-slash"]:
        dest, args = str(tmp_path / "newdir") + "/", []
    elif args == ["--long-name"]:
        dest, args = str(tmp_path / ("d" * 300 + ".qcow2")), []
    result = bc("copy", "--no-daemon", "vm", "vda", dest, *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    _nothing_started(vm, bc)
    assert not any(p.name.startswith("d") and p.suffix == ".qcow2" for p in tmp_path.iterdir())


def test_metadata_preallocation_of_a_raw_destination_by_the_sources_format_is_refused(
        vm_factory, bc: Blockcopy, tmp_path: Path) -> None:
    """Without --format, DEST takes the source's format: for a raw disk, `--preallocation metadata`
    (qcow2 only) was found out only by qemu-img, after the job was journaled (exit 7)."""
    raw = make_image(tmp_path / "src.raw", 16 * MIB, fmt="raw")
    vm = vm_factory([DiskSpec("vda", str(raw), "raw")])
    bc.ok("attach", "vm", "--qmp", str(vm.qmp_socket))
    result = bc("copy", "vm", "vda", str(tmp_path / "d.raw"), "--preallocation", "metadata")
    assert result.returncode == 2 and "--format qcow2" in result.stderr, result.stderr
    _nothing_started(vm, bc)


def test_a_tcp_port_out_of_range_is_a_clear_error(bc: Blockcopy, tmp_path: Path) -> None:
    result = bc("serve", "--listen", ":70000", "--tls-cert", str(tmp_path / "c"), "--tls-key", str(tmp_path / "k"),
                "--token-file", str(tmp_path / "t"), timeout=60)
    assert result.returncode == 2 and "port from 1 to 65535" in result.stderr and "Traceback" not in result.stderr, \
        result.stderr
