"""The library API for management apps: :class:`Manager`.

Every method that touches a domain takes the domain's lock, connects to its QMP socket and first
reconciles every unfinished operation of that domain with the same driver that runs new ones, so a
command interrupted by Ctrl-C or ``kill -9`` is finished or rolled back by the next command.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import stat
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from blockcopy import images, nodes
from blockcopy.defaults import (
    CLIENT_KEY_MAX,
    COMMAND_TIMEOUT,
    FORMATS,
    MAX_BUF_SIZE,
    MIB,
    MODES,
    PREALLOCATIONS,
    TRANSITION_TIMEOUT,
    default_buf_size,
    default_state_dir,
)
from blockcopy.driver import DoneHere, Driver, Link, ProgressCallback, Until, holds_guest, recovery_order
from blockcopy.errors import (
    BlockcopyError,
    DomainBusy,
    GuestLeftPaused,
    Interrupted,
    MonitorBusy,
    MonitorError,
    NotFound,
    NotReady,
    OperationFailed,
    QemuGone,
    RecoveryIncomplete,
    RequestConflict,
    TransitionStalled,
    UsageError,
)
from blockcopy.journal import Domain, Journal
from blockcopy.locking import DomainLock
from blockcopy.monitor import DeviceInfo, Monitor, devices_from_query_block
from blockcopy.protocol import MIGRATION_ENDED, fills_for_goal, page_cache_fill_unused
from blockcopy.qemuproc import QemuProcess
from blockcopy.records import CopyRequest, DiskRecord, Goal, Operation, Outcome, Phase, Stage, withdrawn_note

log = logging.getLogger(__name__)

class Manager:
    """Live block copy for QEMU domains, with a durable journal in ``state_dir``."""

    def __init__(self, state_dir: Path | str | None = None, *, lock_wait: float = 0.0,
                 qmp_timeout: float = 5.0, command_timeout: float = COMMAND_TIMEOUT,
                 transition_timeout: float = TRANSITION_TIMEOUT, create_journal: bool = True) -> None:
        """``create_journal=False`` refuses a state directory without a journal (JournalError)
        instead of starting an empty one: recovery must never mistake "wrong directory" for
        "nothing to do". ``qmp_timeout``: for QEMU's greeting; ``command_timeout``: for the answer
        to a command; ``transition_timeout``: for a pivot, finish or abort to come about (and for a
        silent QEMU to answer again) before blockcopy rolls back or gives up.

        :raise JournalError: the state directory or journal cannot be used.
        """
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.journal = Journal(self.state_dir, create=create_journal)
        self.lock_wait = lock_wait
        self.qmp_timeout = qmp_timeout
        self.command_timeout = command_timeout
        self.transition_timeout = transition_timeout
        self.interrupt = asyncio.Event()  # set it (e.g. on SIGINT) to stop waiting for a copy; cleared then
        # What its drivers did to QEMU that the journal does not say (see DoneHere): a later run of a
        # job knows it.
        self.done_here = DoneHere()

    def close(self) -> None:
        self.journal.close()

    # --- domains ---------------------------------------------------------------------------------

    async def attach(self, name: str, qmp_socket: str) -> Domain:
        """Register a running QEMU by its QMP socket, after checking blockcopy can talk to it; the
        process that answers is recorded. Re-attaching a domain that has unfinished jobs is refused:
        their QEMU is the one they were journaled with.

        :raise UsageError: bad name, or unfinished jobs.
        :raise MonitorError: the socket does not answer (NoListener, MonitorBusy, ...).
        :raise DomainBusy: another blockcopy works on the domain.
        """
        if not name or "/" in name or not name.isprintable():
            raise UsageError(f"invalid domain name {name!r}: use a non-empty name of printable characters "
                             "without '/'")
        _check_path("the QMP socket", qmp_socket)
        path = os.path.abspath(qmp_socket)
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise UsageError(f"the QMP socket path {path!r} is longer than unix sockets allow ({UNIX_PATH_MAX} "
                             "bytes); give QEMU a shorter -qmp path")
        async with self._exclusive(name):
            self._refuse_unfinished(name, "re-attaching it")
            monitor = await self._connect(path)
            try:
                await monitor.run_state()
            finally:
                await monitor.close()
            return self.journal.add_domain(name, path, monitor.process)

    def detach(self, name: str) -> None:
        """Forget a domain. :raise UsageError: unknown, or it has unfinished jobs. :raise DomainBusy."""
        self._domain(name)
        with DomainLock(self.state_dir, name, wait=self.lock_wait):
            self._refuse_unfinished(name, "detaching")
            self.journal.remove_domain(name)

    def _refuse_unfinished(self, name: str, doing: str) -> None:
        active = self.journal.operations(domain=name, unfinished=True)
        if active:
            ids = ", ".join(op.id for op in active)
            raise UsageError(f"domain {name} has unfinished jobs ({ids}); pivot, finish or abort them, "
                             f"or run `blockcopy recover`, before {doing}")

    def domains(self) -> list[Domain]:
        return self.journal.domains()

    async def disks(self, name: str) -> list[DeviceInfo]:
        async with self._session(name) as (monitor, _driver):
            return await self._running(name, monitor).devices()

    # --- jobs ------------------------------------------------------------------------------------

    async def copy(self, request: CopyRequest, *, until: Until = Until.STARTED,
                   on_progress: ProgressCallback | None = None) -> Operation:
        """Validate, journal and start a copy; then drive it as far as ``until`` and ``goal`` say."""
        return (await self.copy_or_replay(request, until=until, on_progress=on_progress))[0]

    async def copy_or_replay(self, request: CopyRequest, *, until: Until = Until.STARTED,
                             on_progress: ProgressCallback | None = None) -> tuple[Operation, bool]:
        """``copy``, and whether it created the job (False: the request id's job, nothing started).
        In the daemon (``reconciles`` False) the job is only planned and journaled here: its task,
        the one owner of a job, starts it."""
        _check_options(request)
        if request.goal in (Goal.PIVOT, Goal.FINISH) and self.reconciles:
            until = Until.DONE
        if self._replayed(request) is not None:
            return await self._drive_again(request, until, on_progress), False
        async with self._session(request.domain, on_progress) as (monitor, driver):
            if self._replayed(request) is not None:  # (sent twice at once: the other one won)
                replayed = self._operation(self._replayed(request) or "")
                return (await self._drive(driver, replayed, until, withdraw_to=None) if self.reconciles
                        else replayed), False
            op = await self._plan(request, self._running(request.domain, monitor))
            _refuse_busy(op, self.journal.operations(unfinished=True))  # again: planning ran in a thread
            op = dataclasses.replace(op, client_key=request.client_key,
                                     request_digest=request.digest() if request.client_key else None)
            op = self.journal.save(op, f"planned: {request.goal.value} of "
                                       + ", ".join(f"{d.name} -> {d.dest_path}" for d in op.disks), new=True)
            if not self.reconciles:
                return op, True
            return await self._drive(driver, op, until, withdraw_to=Goal.COPY), True

    def _replayed(self, request: CopyRequest) -> str | None:
        """The id of the job that ``request``'s idempotency key created already, if any.

        :raise UsageError: the key was used for a different request.
        """
        if request.client_key is None:
            return None
        op = self.journal.by_client_key(request.client_key)
        if op is None:
            return None
        if op.request_digest != request.digest() or op.domain != request.domain:
            raise RequestConflict(f"request id {request.client_key!r} was used for a different request (job {op.id}); "
                             "use a new request id for a new copy")
        return op.id

    async def _drive_again(self, request: CopyRequest, until: Until,
                           on_progress: ProgressCallback | None) -> Operation:
        """A request sent again: its job, driven as far as the request asked (nothing new starts)."""
        op = self._operation(self._replayed(request) or "")
        if op.finished or until is Until.STARTED or not self.reconciles:
            return op  # (in the daemon, the job's own task drives it)
        async with self._session(op.domain, on_progress) as (_monitor, driver):
            return await self._drive(driver, self._operation(op.id), until, withdraw_to=None)

    async def set_speed(self, op_id: str, bandwidth_mib: float) -> Operation:
        """Change the copy speed limit of an unfinished job (0: unlimited). Journaled first, then
        sent to QEMU (``block-job-set-speed``); recovery sends it again if a crash came between.

        :raise UsageError: unknown or finished job, a job past its copy, a negative speed, or one
            that QEMU refused (journaled in the job's warnings, not retried).
        """
        if not bandwidth_mib >= 0 or bandwidth_mib == float("inf"):
            raise UsageError(f"speed must be a number of MiB/s, 0 for unlimited, not {bandwidth_mib}")
        op = self._operation(op_id)
        async with self._session(op.domain) as (_monitor, driver):
            op = self._operation(op.id)
            if op.phase not in (Phase.STARTING, Phase.COPYING):
                raise UsageError(f"job {op.id} is {op.phase.value}: its speed can only change while it copies")
            bandwidth = round(bandwidth_mib * MIB)
            op = self.journal.save(dataclasses.replace(op, bandwidth=bandwidth, speed_applied=False),
                                   f"speed {bandwidth_mib:g} MiB/s requested")
            warnings = len(op.warnings)
            op = await self._drive(driver, op, Until.STARTED, withdraw_to=None)
            refused = [w for w in op.warnings[warnings:] if "could not change the speed" in w]
            if refused:  # (as the daemon answers it)
                raise UsageError(f"job {op.id}: QEMU refused the new speed ({refused[0]})")
            return op

    async def pivot(self, op_id: str, *, wait: bool = False,
                    on_progress: ProgressCallback | None = None) -> Operation:
        return await self._conclude(op_id, Goal.PIVOT, wait=wait, on_progress=on_progress)

    async def finish(self, op_id: str, *, wait: bool = False,
                     on_progress: ProgressCallback | None = None) -> Operation:
        return await self._conclude(op_id, Goal.FINISH, wait=wait, on_progress=on_progress)

    async def abort(self, op_id: str) -> Operation:
        return await self._conclude(op_id, Goal.ABORT, wait=True, on_progress=None)

    async def wait_ready(self, op_id: str, *, on_progress: ProgressCallback | None = None) -> Operation:
        op = self._operation(op_id)
        async with self._session(op.domain, on_progress) as (_monitor, driver):
            return await self._drive(driver, self._operation(op_id), Until.READY, withdraw_to=None)

    async def status(self, op_id: str) -> Operation:
        """The operation, reconciled with QEMU when possible, else as last journaled."""
        op = self._operation(op_id)
        if not op.finished:
            await self._reconcile_quietly(op.domain)
        return self._operation(op.id)

    async def jobs(self, domain: str | None = None, *, reconcile: bool = True) -> list[Operation]:
        if reconcile:
            names = {op.domain for op in self.journal.operations(domain=domain, unfinished=True)}
            for name in sorted(names):
                await self._reconcile_quietly(name)
        return self.journal.operations(domain=domain)

    async def _reconcile_quietly(self, name: str) -> None:
        """Reconcile a domain for a listing; what stops it is logged, the listing shows the journal."""
        try:
            async with self._session(name):
                pass
        except (DomainBusy, MonitorBusy):
            pass  # another blockcopy drives it; its journaled progress is recent
        except (MonitorError, UsageError, TransitionStalled, GuestLeftPaused) as exc:
            log.warning("domain %s: %s", name, exc)

    async def recover(self, domain: str | None = None, *, wait: bool = True,
                      on_progress: ProgressCallback | None = None) -> list[Operation]:
        """Reconcile every unfinished operation; with ``wait``, carry journaled pivots/finishes out.

        First every domain is brought to where no guest is paused by blockcopy (pivots that were
        under way are finished or rolled back, aborts carried out); only then does it wait for
        copies to become ready, so a guest never stays paused while another job copies.

        :raise GuestLeftPaused: a guest stays paused (its pivot could not be finished); the other
            domains were recovered.
        :raise RecoveryIncomplete: some domains could not be reached; the others were recovered.
        """
        unfinished = self.journal.operations(domain=domain, unfinished=True)
        # Domains whose guest blockcopy holds paused first: nothing else may keep them waiting.
        names = [op.domain for op in _guests_held_first(unfinished)]
        names = sorted(set(names), key=names.index)
        problems: dict[str, BlockcopyError] = {}

        async def each_domain(reconcile: bool, until_goal: bool) -> None:
            for name in names:
                if name in problems:
                    continue
                try:
                    async with self._session(name, on_progress, reconcile=reconcile) as (_monitor, driver):
                        if until_goal:
                            for op in self.journal.operations(domain=name, unfinished=True):
                                if op.goal is not Goal.COPY:
                                    try:
                                        await self._drive(driver, op, Until.DONE, withdraw_to=None)
                                    except TransitionStalled as exc:  # the domain's other jobs go on
                                        problems.setdefault(name, exc)
                except (DomainBusy, MonitorError, TransitionStalled, GuestLeftPaused) as exc:
                    problems[name] = exc  # the other domains still get recovered

        await each_domain(reconcile=True, until_goal=False)
        if wait:
            await each_domain(reconcile=False, until_goal=True)
        for op in unfinished:
            current = self._operation(op.id)
            if current.domain not in problems and current.phase not in (Phase.DONE, Phase.STARTING, Phase.COPYING):
                problems[current.domain] = TransitionStalled(
                    f"job {op.id} is still {current.phase.value}: QEMU did not carry it out in time")
        if problems:
            text = "; ".join(f"{name}: {exc}" for name, exc in problems.items())
            if any(isinstance(exc, GuestLeftPaused) for exc in problems.values()):
                raise GuestLeftPaused(f"recovery left a guest paused (the other domains were recovered): {text}")
            raise RecoveryIncomplete("could not recover every domain (the others were recovered; run "
                                     f"`blockcopy recover` again once these are reachable): {text}")
        return [self._operation(op.id) for op in unfinished]

    def history(self, op_id: str) -> list[tuple[float, str, str]]:
        self._operation(op_id)
        return [(s.at, s.phase, s.note) for s in self.journal.steps(op_id)]

    # --- internals -------------------------------------------------------------------------------

    def _domain(self, name: str) -> Domain:
        domain = self.journal.domain(name)
        if domain is None:
            known = ", ".join(d.name for d in self.journal.domains()) or "none"
            raise NotFound(f"unknown domain {name!r} (attached: {known}); attach it with "
                             f"`blockcopy attach {name} --qmp SOCKET`")
        return domain

    def _operation(self, op_id: str) -> Operation:
        """A job by its id, or by a unique prefix of it (at least 4 characters)."""
        op = self.journal.get(op_id)
        if op is None and len(op_id) >= 4:
            matches = self.journal.find(op_id)
            if len(matches) > 1:
                raise UsageError(f"job id {op_id!r} is ambiguous: " + ", ".join(m.id for m in matches))
            op = matches[0] if matches else None
        if op is None:
            raise NotFound(f"unknown job {op_id!r}; `blockcopy jobs` lists them")
        return op

    async def _connect(self, socket_path: str) -> Monitor:
        return await Monitor.connect(socket_path, timeout=self.qmp_timeout, command_timeout=self.command_timeout)

    def _running(self, name: str, monitor: Monitor | None) -> Monitor:
        """The monitor of a domain that must be running for what was asked."""
        if monitor is None:
            raise QemuGone(f"domain {name}: cannot reach QEMU at {self._domain(name).qmp_socket}; is the VM "
                           "running?")
        return monitor

    @asynccontextmanager
    async def _session(self, name: str, on_progress: ProgressCallback | None = None, *,
                       reconcile: bool = True) -> AsyncIterator[tuple[Monitor | None, Driver]]:
        """Lock the domain, connect (None when nothing answers) and reconcile its unfinished jobs."""
        self._domain(name)
        async with self._exclusive(name):
            domain = self._domain(name)  # again, under the lock: a detach may have come first
            link = await self._open_link(domain)
            unfinished = _guests_held_first(self.journal.operations(domain=name, unfinished=True))
            if isinstance(link.error, MonitorBusy) and not any(holds_guest(op) for op in unfinished):
                # (A guest that blockcopy holds paused goes on below: the driver retries a QEMU that
                # does not answer for the time limit, then says plainly that the guest stays paused.)
                if unfinished:
                    raise MonitorBusy(f"{link.error}. The unfinished jobs of domain {name} ("
                                      f"{', '.join(op.id for op in unfinished)}) stay as journaled; run "
                                      "`blockcopy recover` once QEMU answers") from None
                raise link.error
            driver = self._driver(link, on_progress)
            try:
                if reconcile and self.reconciles:
                    for op in unfinished:
                        try:
                            await driver.run(self._operation(op.id), Until.STARTED)
                        except TransitionStalled as exc:
                            # One job that QEMU does not end (its storage hangs) must not keep the
                            # others, or new commands on other disks, from going on.
                            log.warning("domain %s: %s", name, exc)
                yield link.monitor, driver
            finally:
                await self._close_link(link)

    # The hooks where the daemon (blockcopy.service) differs: it keeps one link per domain open,
    # serialises a domain's requests in memory, and its job tasks, not each request, drive the jobs.

    #: whether a session first drives the domain's unfinished jobs (a command does; in the daemon,
    #: each job's own task does)
    reconciles = True

    @asynccontextmanager
    async def _exclusive(self, name: str) -> AsyncIterator[None]:
        """One blockcopy at a time on a domain. :raise DomainBusy."""
        with DomainLock(self.state_dir, name, wait=self.lock_wait):
            yield

    async def _open_link(self, domain: Domain) -> Link:
        link = Link(domain.qmp_socket, lambda: self._connect(domain.qmp_socket))
        await link.open()
        return link

    async def _close_link(self, link: Link) -> None:
        await link.drop()

    def _driver(self, link: Link, on_progress: ProgressCallback | None = None) -> Driver:
        return Driver(self.journal, link, on_progress=on_progress, interrupt=self.interrupt,
                      transition_timeout=self.transition_timeout, done_here=self.done_here)

    async def _drive(self, driver: Driver, op: Operation, until: Until, *, withdraw_to: Goal | None) -> Operation:
        """Run ``op``; an interrupted wait withdraws the --pivot/--finish wish of the command that
        waits, putting back the goal it replaced (``withdraw_to``; None: the call journaled no
        goal), never a goal journaled earlier (by another command, an app, the same request sent
        before), which `recover` carries out."""
        try:
            return await driver.run(op, until)
        except Interrupted as exc:
            current = self._operation(op.id)
            if (withdraw_to is not None and current.phase is Phase.COPYING and current.goal is not withdraw_to
                    and current.goal in (Goal.PIVOT, Goal.FINISH)):
                current = self.journal.save(current.with_goal(withdraw_to), withdrawn_note(withdraw_to))
            if current.goal in (Goal.PIVOT, Goal.FINISH) and current.outcome is None:
                raise Interrupted(f"{exc}; the {current.goal.value} asked before it stands (carried out once the "
                                  "copy is ready)") from exc
            raise

    async def _conclude(self, op_id: str, goal: Goal, *, wait: bool,
                        on_progress: ProgressCallback | None) -> Operation:
        op = self._operation(op_id)
        async with self._session(op.domain, on_progress) as (_monitor, driver):
            op = self._operation(op_id)
            refuse_concluded(op, goal)
            ready = all(d.job_status == "ready" for d in op.disks)
            if goal is not Goal.ABORT and not wait and not ready:
                raise NotReady(f"job {op_id} is not ready to {goal.value} yet: {_progress_text(op)}. "
                               f"Wait with `blockcopy {goal.value} {op_id} --wait`")
            # (a goal journaled earlier, e.g. by an app, is not this wait's to withdraw; one it
            # replaces is put back)
            withdraw_to = op.goal if op.goal is not goal else None
            op = self.journal.save(op.with_goal(goal), f"{goal.value} requested")
            return await self._drive(driver, op, Until.DONE, withdraw_to=withdraw_to)

    async def _plan(self, request: CopyRequest, monitor: Monitor) -> Operation:
        """Check every input against QEMU and the journal; nothing is touched before this passes."""
        qemu = monitor.process
        if qemu is None:
            raise UsageError(
                f"cannot tell which process serves the QMP socket {monitor.socket_path} (the kernel named no "
                "process in this PID namespace, or /proc hides it). blockcopy must see QEMU's process to "
                "decide after a crash whether QEMU exited; run blockcopy in QEMU's PID namespace with /proc "
                "visible")
        await _refuse_migration(monitor, request.domain)
        block, named, graph, fdsets = await asyncio.gather(
            monitor.block(), monitor.named_nodes(), monitor.execute("x-debug-query-block-graph"), monitor.fdsets())
        active = self.journal.operations(unfinished=True)
        # The rest reads files (qemu-img, stat, an O_DIRECT probe): in a thread, so that storage
        # that hangs or a slow probe keeps no other domain of the daemon waiting.
        return await asyncio.to_thread(_plan_disks, request, qemu, block, named, graph, fdsets, active)


def _plan_disks(request: CopyRequest, qemu: QemuProcess, block: list[dict[str, Any]], named: list[dict[str, Any]],
                graph: Any, fdsets: Any, active: list[Operation]) -> Operation:
    """The record of a new copy, from QEMU's answers and the checks of every file it names."""
    devices = devices_from_query_block(block, fdsets)
    argv = nodes.options_from_argv(_cmdline(qemu.pid))
    busy_keys = {(op.domain, d.device_key): op.id for op in active for d in op.disks}
    busy_dests = {os.path.realpath(d.dest_path): op.id for op in active for d in op.disks}
    op_id = os.urandom(8).hex()  # 64 random bits (as secrets.token_hex); the first save refuses a taken id
    disks: list[DiskRecord] = []
    warnings: list[str] = []
    seen_devices: set[str] = set()
    seen_dests: set[str] = set()
    for index, (disk_name, dest) in enumerate(request.targets):
        device = _find_device(devices, disk_name, request.domain)
        if device.device_key in seen_devices:
            raise UsageError(f"disk {disk_name} is named twice in one copy")
        seen_devices.add(device.device_key)
        holder = busy_keys.get((request.domain, device.device_key))
        if holder:
            raise UsageError(f"disk {device.name} already has block copy job {holder}; "
                             f"pivot, finish or abort it first (`blockcopy status {holder}`)")
        if device.read_only:
            raise UsageError(f"disk {device.name} is read-only: blockcopy moves disks the guest writes. A "
                             "read-only image does not change; copy it with `qemu-img convert` and switch "
                             "the medium (QMP blockdev-change-medium) or the VM's configuration")
        entry = next(e for e in block if e.get("inserted") and _device_key_of(e) == device.device_key)
        try:
            tree = nodes.node_tree(entry, named, graph, argv=argv)
        except nodes.NodeTreeError as exc:
            raise UsageError(f"disk {device.name}: {exc}") from None
        _refuse_source(device, tree, named, request, argv)
        dest_format = request.format or device.format
        if request.preallocation == "metadata" and dest_format == "raw" and not request.reuse_external:
            raise UsageError(f"--preallocation metadata is for qcow2 destinations, and disk {device.name}'s is raw "
                             "(the source's format): pass --format qcow2, or take off, falloc or full")
        if tree.format is None and dest_format != "raw":
            raise UsageError(f"disk {device.name} is a raw {tree.protocol.driver} node without a format node; "
                             "its destination must be raw (--format raw)")
        real, identity, is_block = _check_destination(
            dest, device, request, dest_format, sources=[f for d in devices for f in (d.file, *d.backing_chain)])
        # Journaled as resolved: the file (reused) or directory (created) that was checked.
        dest = real if request.reuse_external else os.path.join(os.path.realpath(os.path.dirname(dest)),
                                                                 os.path.basename(dest))
        directory = os.stat(os.path.dirname(dest)) if not request.reuse_external else None
        if real in seen_dests or real in busy_dests:
            raise UsageError(f"destination {dest} is already the destination of another copy")
        seen_dests.add(real)
        backing_file = backing_format = None
        if request.shallow and device.backing_chain and not request.reuse_external:
            backing_file, backing_format = device.backing_chain[0], device.backing_format
        dest_node = f"bc-{op_id}-{index}"
        try:
            dest_args = nodes.dest_blockdev_args(
                tree, dest, dest_format, dest_node, f"{dest_node}-file" if tree.format else dest_node,
                is_block_device=is_block, overrides=request.dest_options,
                # A full copy stands alone (never a backing file named in DEST); a shallow one
                # sits on the source's own backing node, as the source does.
                **({} if dest_format != "qcow2" else
                   {"backing": tree.backing if request.shallow and tree.backing else None}))
        except nodes.NodeTreeError as exc:
            raise UsageError(f"disk {device.name}: {exc}") from None
        dest_args = _without_auto_read_only(dest_args)
        if is_block and dest_format == "raw" and _block_size(real) > device.virtual_size:
            # The guest must see the disk it had, not the whole (larger) device.
            if tree.format is None:
                raise UsageError(f"--reuse-external: block device {dest} is larger than disk {device.name} "
                                 f"({device.virtual_size} bytes), whose image is its {tree.protocol.driver} node "
                                 "itself, with no raw format node to limit what the guest sees (QEMU refuses a "
                                 "mirror between sizes): use a device of exactly that size")
            dest_args = _raw_size(dest_args, device.virtual_size)
        refusal = nodes.o_direct_refusal(dest_args, dest, nodes.probe_o_direct(dest))
        if refusal:
            raise UsageError(f"disk {device.name}: {refusal}")
        warnings.extend(f"disk {device.name}: {w}" for w in nodes.unknown_option_warnings(tree)
                        if not any(f"--dest-option {k}=" in w for k in request.dest_options))
        if tree.filters:
            names = ", ".join(f"{f.driver} {f.name}" for f in tree.filters)
            warnings.append(f"disk {device.name}: the filters above its image ({names}) stay in place; a "
                            "throttle limits the copy too, as the mirror reads through it")
        disks.append(DiskRecord(
            name=device.name, device_key=device.device_key, source_node=tree.root,
            source_file=device.file, source_format=tree.image_format,
            source_file_node=tree.protocol.name if tree.format else None, virtual_size=device.virtual_size,
            dest_path=dest, dest_format=dest_format, dest_node=dest_node,
            job_id=f"bcj-{op_id}-{index}", backing_file=backing_file,
            backing_format=backing_format, dest_dev=identity[0] if identity else None,
            dest_ino=identity[1] if identity else None,
            dest_dir_dev=directory.st_dev if directory else None,
            dest_dir_ino=directory.st_ino if directory else None,
            dest_args=dest_args, replaces=tree.image.name if tree.filters else None,
            source_below=tree.nodes_below_image(with_backing_chain=not request.shallow),
            dest_owner=_dest_owner(request, device.file), dest_mode=_dest_mode(request, device.file),
            cluster_size=request.cluster_size or (tree.cluster_size if dest_format == "qcow2" else None),
            preallocation=request.preallocation,
            stage=Stage.ADD if request.reuse_external else Stage.CREATE))
    bandwidth = int(request.bandwidth_mib * MIB) if request.bandwidth_mib else 0
    op = Operation(id=op_id, domain=request.domain, goal=request.goal, phase=Phase.STARTING,
                     qemu_pid=qemu.pid, qemu_start=qemu.start_time, qemu_boot=qemu.boot_id,
                     qemu_pidns=qemu.pid_ns,
                     disks=tuple(disks), mode=request.mode, shallow=request.shallow,
                     reuse_external=request.reuse_external, bandwidth=bandwidth,
                     buf_size=request.buf_size if request.buf_size is not None else default_buf_size(bandwidth),
                     page_cache_fill=request.page_cache_fill, warnings=tuple(warnings))
    unused = [f"disk {d.name}: the page-cache fill (--page-cache-fill) does nothing here: {reason}"
              for d in op.disks if (reason := page_cache_fill_unused(op, d))]
    if unused:
        op = dataclasses.replace(op, warnings=(*op.warnings, *unused))
    if op.page_cache_fill and not fills_for_goal(op.goal):
        op = dataclasses.replace(op, page_cache_fill=False)  # (said above; a later pivot does not fill)
    return op


def refuse_concluded(op: Operation, goal: Goal) -> None:
    """A pivot, finish or abort asked of a job whose outcome is journaled (it has ended, or only
    its cleanup is left), or a pivot or finish of a job being aborted.

    :raise OperationFailed: it ended failed. :raise UsageError: otherwise.
    """
    if op.finished or op.outcome is not None:
        message = (f"job {op.id} has already ended: outcome {op.outcome}, authoritative image: "
                   f"{op.authoritative}" + (f"; error: {op.error}" if op.error else ""))
        raise OperationFailed(message) if op.outcome is Outcome.FAILED else UsageError(message)
    if goal is not Goal.ABORT and op.goal is Goal.ABORT:
        raise UsageError(f"job {op.id} is being aborted")


def _refuse_busy(op: Operation, active: Sequence[Operation]) -> None:
    """A disk or destination that another unfinished job took while this one was planned."""
    keys = {(o.domain, d.device_key): o.id for o in active for d in o.disks}
    dests = {d.dest_path: o.id for o in active for d in o.disks}  # (journaled resolved: no file system call)
    for disk in op.disks:
        holder = keys.get((op.domain, disk.device_key)) or dests.get(disk.dest_path)
        if holder:
            raise UsageError(f"disk {disk.name} or its destination {disk.dest_path} was taken by job {holder} "
                             "meanwhile; nothing was started")


def _chain_encrypted(device: DeviceInfo, named: list[dict[str, Any]], *, shallow: bool) -> bool:
    """query-named-block-nodes' image info of the disk's top node, down its backing images (covers
    layers QEMU opened itself, which have no name of their own)."""
    top = next((n for n in named if n.get("node-name") == device.node), {})
    image = top.get("image") or {}
    while image:
        if image.get("encrypted"):
            return True
        if shallow:
            return False
        image = image.get("backing-image") or {}
    return False


def _refuse_source(device: DeviceInfo, tree: nodes.NodeTree, named: list[dict[str, Any]],
                   request: CopyRequest, argv: nodes.ArgvOptions) -> None:
    """Sources that a mirror cannot move as they are, refused before anything is touched."""
    layers = [tree.image.name, *([] if request.shallow else tree.backing_chain_nodes)]
    if any(n.get("encrypted") for n in named if n.get("node-name") in layers) or _chain_encrypted(
            device, named, shallow=request.shallow):
        raise UsageError(f"disk {device.name} is encrypted: blockcopy would write the guest's data to DEST in "
                         "the clear (it does not create encrypted images). Leave it where it is, or copy it with "
                         "`qemu-img convert` and the image's secret while the VM is shut down")
    cor = [f.name for f in tree.filters if f.driver == "copy-on-read"]
    if tree.drive_id is not None and tree.drive_id in argv.copy_on_read:
        cor.append(f"-drive {tree.drive_id},copy-on-read=on")
    if cor and device.backing_chain and not request.shallow:
        # The mirror reads through the filters above the image; a copy-on-read filter turns every
        # read of a cluster that lives in the backing chain into a write of it into the source.
        raise UsageError(f"disk {device.name} sits under a copy-on-read filter ({', '.join(cor)}) over a backing "
                         "chain: a full copy would read the whole chain through it and write every backing "
                         "cluster into the source image. Copy with --shallow (DEST gets the same backing "
                         "file), or remove the filter first")


async def _refuse_migration(monitor: Monitor, domain: str) -> None:
    """A VM being migrated (or paused for it) is not copied: its disks are about to change hands.

    Nor is one stopped in a state that only a migration or a start leaves: ``inmigrate`` (waiting
    for an incoming migration), ``postmigrate`` (migrated away, or stopped after a migration that
    did not finish) and ``prelaunch`` (started with -S and not continued yet, or reset while
    stopped: a manager holds a VM there while it sets it up, as libvirt starts every domain). Each
    gets a message that says what it is and what to do: "being migrated" would send the user
    looking for a migration that does not run."""
    state = await monitor.run_state()
    migration = await monitor.migration_status()
    where = f"run state {state}, migration {migration}"
    if migration not in MIGRATION_ENDED or state == "finish-migrate":
        raise UsageError(f"domain {domain} is being migrated ({where}); "
                         "copy its disks before or after the migration, not during it")
    if state == "inmigrate":
        raise UsageError(f"domain {domain} waits for an incoming migration ({where}: QEMU started with -incoming); "
                         "copy its disks once the migration has ended and the guest runs here")
    if state == "postmigrate" and migration == "completed":
        raise UsageError(f"domain {domain} was migrated away ({where}): its guest runs on the destination now; "
                         "copy its disks there")
    if state == "postmigrate":
        raise UsageError(f"domain {domain} is stopped after a migration ({where}); resume it (QMP `cont`, "
                         "`virsh resume`) and copy again, or copy its disks where the guest runs now")
    if state == "prelaunch":
        raise UsageError(f"domain {domain} is stopped before its start ({where}: started with -S and not "
                         "continued yet, or reset while stopped); resume it (QMP `cont`, `virsh resume`) and copy "
                         "again, or shut it down and copy its images offline with `qemu-img convert`")


def _cmdline(pid: int) -> list[str]:
    """QEMU's command line: the one place where options QMP never reports (aio, discard) are written."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as raw:
            return [part.decode(errors="replace") for part in raw.read().split(b"\0") if part]
    except OSError:
        return []


def _device_key_of(entry: Mapping[str, Any]) -> str:
    return str(entry.get("qdev") or entry.get("device") or "")


def _block_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _without_auto_read_only(args: Mapping[str, Any]) -> dict[str, Any]:
    """DEST is opened read-write from its one descriptor (see Driver._add_dest): not read-only first."""
    out = {k: v for k, v in args.items() if k != "auto-read-only"}
    if isinstance(out.get("file"), Mapping):
        out["file"] = _without_auto_read_only(out["file"])
    return out


def _raw_size(args: Mapping[str, Any], size: int) -> dict[str, Any]:
    """A raw node on a block device larger than the disk, limited to the disk's size."""
    out = dict(args)
    if out.get("driver") == "raw":
        out["size"] = size
    return out


def _dest_owner(request: CopyRequest, source: str) -> tuple[int, int] | None:
    """DEST's owner: asked for, else the source file's (a QEMU that runs as its own user opens DEST
    again by path after a restart)."""
    if request.owner is not None:
        return request.owner
    st = _stat_or_none(source)
    return None if st is None else (st.st_uid, st.st_gid)


def _dest_mode(request: CopyRequest, source: str) -> int | None:
    if request.mode_bits is not None:
        return request.mode_bits
    st = _stat_or_none(source)
    return None if st is None else stat.S_IMODE(st.st_mode) & 0o666


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _guests_held_first(ops: Sequence[Operation]) -> list[Operation]:
    """Operations in recovery order (driver.recovery_order), each group in creation order."""
    return sorted(ops, key=recovery_order)


#: The longest path a unix socket can have (sun_path, less its terminating NUL).
UNIX_PATH_MAX = 107


#: The longest file name Linux file systems take (a longer one fails only at link(2), after the
#: job was journaled); the largest uid or gid (2**32 - 1 is -1, "unchanged", to chown).
NAME_MAX = 255
MAX_ID = 2**32 - 2


def _check_path(what: str, path: str) -> None:
    if not path or "\0" in path:
        raise UsageError(f"{what} must be a non-empty path without NUL characters, not {path!r}")


def _check_options(request: CopyRequest) -> None:
    if not request.targets:
        raise UsageError("name at least one disk to copy: --disk DISK=DEST")
    for disk, dest in request.targets:
        _check_path("a destination", dest)
        name = os.path.basename(dest)
        if name in ("", ".", ".."):
            raise UsageError(f"destination {dest!r} names a directory; give the path of the image file, e.g. "
                             f"{os.path.join(dest, 'disk.qcow2')}")
        if len(os.fsencode(name)) > NAME_MAX:
            raise UsageError(f"destination {dest!r}: a file name has at most {NAME_MAX} bytes; choose a shorter one")
        if not disk or "\0" in disk:
            raise UsageError(f"a disk must be named by a non-empty qdev id, drive id or node name, not {disk!r}")
    if "auto-read-only" in request.dest_options:
        raise UsageError("--dest-option auto-read-only does not apply: blockcopy opens DEST read-write from the "
                         "one descriptor it passes to QEMU (a read-only disk is refused anyway)")
    if request.mode not in MODES:
        raise UsageError(f"unknown mode {request.mode!r}: use one of {', '.join(MODES)}")
    if request.format is not None and request.format not in FORMATS:
        raise UsageError(f"unsupported destination format {request.format!r}: use one of {', '.join(FORMATS)}")
    if request.bandwidth_mib is not None and not request.bandwidth_mib > 0:
        raise UsageError(f"bandwidth must be a positive number of MiB/s, not {request.bandwidth_mib}")
    if request.buf_size is not None and not 0 < request.buf_size <= MAX_BUF_SIZE:
        raise UsageError(f"buffer size must be between 1 byte and {MAX_BUF_SIZE // MIB} MiB, not "
                         f"{request.buf_size} (QEMU rounds it up to the job's granularity)")
    if request.shallow and request.format == "raw":
        raise UsageError("--shallow needs a qcow2 destination (raw images cannot have a backing file)")
    if request.preallocation is not None and request.preallocation not in PREALLOCATIONS:
        raise UsageError(f"unknown preallocation {request.preallocation!r}: use one of {', '.join(PREALLOCATIONS)}")
    if request.preallocation == "metadata" and request.format == "raw":
        raise UsageError("--preallocation metadata is for qcow2 destinations; raw takes off, falloc or full")
    if request.cluster_size is not None and not (512 <= request.cluster_size <= 2 * MIB
                                                 and request.cluster_size & (request.cluster_size - 1) == 0):
        raise UsageError(f"cluster size must be a power of two from 512 bytes to 2 MiB, not {request.cluster_size}")
    if request.owner is not None and not all(0 <= i <= MAX_ID for i in request.owner):
        raise UsageError(f"owner ids must be between 0 and {MAX_ID}, not {request.owner[0]}:{request.owner[1]}")
    if request.mode_bits is not None and not 0 <= request.mode_bits <= 0o777:
        raise UsageError(f"file mode must be between 0000 and 0777, not {request.mode_bits:o}")
    key = request.client_key
    if key is not None and not (0 < len(key) <= CLIENT_KEY_MAX and key.isprintable() and key.isascii()):
        raise UsageError(f"a request id must be 1 to {CLIENT_KEY_MAX} printable ASCII characters")


def _find_device(devices: Sequence[DeviceInfo], name: str, domain: str) -> DeviceInfo:
    for device in devices:
        if name in (device.qdev_id, device.drive_id, device.node):
            return device
    names = ", ".join(d.name for d in devices) or "none"
    raise UsageError(f"domain {domain} has no disk {name!r}; its disks: {names} "
                     "(a qdev id, drive id or node name)")


def _file_node(nodes: Sequence[dict[str, object]], device: DeviceInfo) -> str | None:
    """The user-created protocol node under the device's format node, to delete after a pivot."""
    for node in nodes:
        name = str(node.get("node-name") or "")
        if (name and name != device.node and not name.startswith("#") and node.get("drv") == "file"
                and node.get("file") == device.file):
            return name
    return None


def _check_destination(dest: str, device: DeviceInfo, request: CopyRequest, dest_format: str, *,
                       sources: Sequence[str] = ()) -> tuple[str, tuple[int, int] | None, bool]:
    """Refuse any destination that could lose data; returns its resolved path, for a reused DEST
    the identity (st_dev, st_ino) of the file that was checked, and whether it is a block device."""
    if not os.path.isabs(dest):
        raise UsageError(f"destination {dest!r} must be an absolute path (QEMU does not share "
                         "blockcopy's working directory)")
    real = os.path.realpath(dest)
    for image in (device.file, *device.backing_chain):
        if real == os.path.realpath(image):
            role = "the source image" if image == device.file else "in the source's backing chain"
            raise UsageError(f"destination {dest} is {role} of disk {device.name}; choose another path")
    if request.shallow and dest_format == "raw":
        raise UsageError("--shallow needs a qcow2 destination (raw images cannot have a backing file)")
    parent = os.path.dirname(real)
    if os.path.exists(real) and stat.S_ISBLK(os.stat(real).st_mode) and not request.reuse_external:
        raise UsageError(f"destination {dest} is a block device: blockcopy never creates or truncates one. "
                         "Pass --reuse-external to copy onto it (its size must fit the disk)")
    if not os.path.isdir(parent):
        raise UsageError(f"the directory of destination {dest} does not exist; create {parent} first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"the directory {parent} is not writable; choose another destination")
    exists = os.path.lexists(dest)
    if not request.reuse_external:
        if exists:
            raise UsageError(f"destination {dest} already exists; blockcopy never overwrites a file. "
                             "Choose a new path, or pass --reuse-external to use this image as it is")
        return real, None, False
    if not exists:
        raise UsageError(f"--reuse-external: destination {dest} does not exist; create it first "
                         "(e.g. qemu-img create) or drop --reuse-external")
    # The identity journaled is that of the file checked here: taken before and after reading it.
    try:
        before = os.lstat(real)
    except OSError as exc:
        raise UsageError(f"--reuse-external: cannot use {dest}: {exc.strerror}") from None
    if not (stat.S_ISREG(before.st_mode) or stat.S_ISBLK(before.st_mode)):
        raise UsageError(f"--reuse-external: {dest} is not an image file or block device")
    try:
        info = images.info(real, dest_format)
    except images.ImageError as exc:
        try:
            found = images.info(real).format  # only to name it in the message; never used as probed
        except images.ImageError:
            raise UsageError(f"--reuse-external: {dest} is not a readable {dest_format} image: {exc}") from None
        raise UsageError(f"--reuse-external: {dest} is a {found} image, not {dest_format}; "
                         f"pass --format {found} or use a {dest_format} image") from None
    if info.data_file is not None:
        raise UsageError(f"--reuse-external: {dest} keeps its data in an external data file ({info.data_file}), "
                         "which QEMU would open by that path, past blockcopy's checks: use an image without one "
                         f"(qemu-img create -f {dest_format} without data_file)")
    if request.shallow:
        try:
            holds_data = images.own_layer_allocated(real)
        except images.ImageError as exc:
            raise UsageError(f"--shallow --reuse-external: {exc}") from None
        if holds_data:
            # QEMU 7.2's shallow mirror (sync: top) copies only what the source's top layer holds
            # and does not clear its target: DEST's own clusters would show through (review 39).
            raise UsageError(f"--shallow --reuse-external: {dest} holds clusters of its own (data or zeroes), which "
                             "the guest would read wherever its own top layer holds nothing (a shallow copy writes "
                             "only that layer). Use an "
                             "empty image over the same backing file (qemu-img create -f qcow2 -b BACKING -F FORMAT "
                             "DEST), or drop --shallow")
    after = os.lstat(real)
    if (before.st_dev, before.st_ino) != (after.st_dev, after.st_ino):
        raise UsageError(f"--reuse-external: {dest} was replaced while blockcopy checked it; try again")
    in_use = images.locked_by(real, dest_format)
    if in_use:
        raise UsageError(f"--reuse-external: {dest} is in use by another process ({in_use}): another VM's disk? "
                         "blockcopy never mirrors onto an image someone else has open")
    is_block = stat.S_ISBLK(before.st_mode)
    if is_block:
        _refuse_held_block_device(dest, real)
    # By what the data lives on, not by name or lock: the same file under another name (a hard link,
    # a bind mount) of a source opened with locking=off, or the file behind a loop device the VM
    # uses, carries no lock that `locked_by` could see (review 39: both were mirrored onto).
    for other in sources:
        if images.overlaps(real, other):
            raise UsageError(f"--reuse-external: {dest} shares storage with {other}, an image of this VM (the same "
                             "file under another name, a partition and its disk, a device-mapper or md device and "
                             "what it is built on, a loop device and its file): writing it would change that image")
    if is_block and dest_format == "raw":
        size = _block_size(real)
        if size < device.virtual_size:
            raise UsageError(f"--reuse-external: block device {dest} holds {size} bytes, less than disk "
                             f"{device.name} ({device.virtual_size} bytes)")
    elif info.virtual_size != device.virtual_size:
        relation = "smaller than" if info.virtual_size < device.virtual_size else "larger than"
        raise UsageError(f"--reuse-external: {dest} has virtual size {info.virtual_size} bytes, "
                         f"{relation} disk {device.name} ({device.virtual_size} bytes); sizes must match")
    if request.shallow:
        _check_reused_backing(dest, info, device)
    return real, (before.st_dev, before.st_ino), is_block


def _refuse_held_block_device(dest: str, real: str) -> None:
    """A mounted file system, a device-mapper or md member holds its block device exclusively; QEMU's
    image locks do not show that. The kernel refuses O_EXCL to anyone else while such a holder lives."""
    try:
        fd = os.open(real, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise UsageError(f"--reuse-external: block device {dest} is in use (mounted, or held by device-mapper, "
                             "md or another exclusive user); blockcopy never mirrors onto a device someone else "
                             "holds. Unmount or release it first") from None
        raise UsageError(f"--reuse-external: cannot open block device {dest}: {exc.strerror}") from None
    os.close(fd)


def _check_reused_backing(dest: str, info: images.ImageInfo, device: DeviceInfo) -> None:
    """A shallow copy holds only the top layer: the rest of the guest's data must come from the very
    backing image the source has, or the guest would read zeros (or someone else's data) there."""
    want = device.backing_chain[0] if device.backing_chain else None
    have = info.backing_file
    if want is None and have is None:
        return
    if want is None:
        raise UsageError(f"--shallow --reuse-external: {dest} has a backing file ({have}) but disk {device.name} "
                         "has none; use an image without a backing file")
    if have is None:
        raise UsageError(f"--shallow --reuse-external: {dest} has no backing file, so the guest would read "
                         f"zeros wherever its data lives in {want}. Create it with "
                         f"`qemu-img create -f qcow2 -b {want} -F {device.backing_format or 'qcow2'} {dest}`")
    if os.path.realpath(have) != os.path.realpath(want):
        raise UsageError(f"--shallow --reuse-external: {dest}'s backing file is {have}, but disk {device.name} is "
                         f"backed by {want}; they must be the same image")
    if info.backing_format != (device.backing_format or "qcow2"):
        # Without a backing format in the header QEMU would probe the base image's format.
        raise UsageError(f"--shallow --reuse-external: {dest} names its backing file's format as "
                         f"{info.backing_format or 'nothing'}, but {want} is {device.backing_format or 'qcow2'}. "
                         f"Create it with `qemu-img create -f qcow2 -b {want} -F {device.backing_format or 'qcow2'} "
                         f"{dest}`")


def _progress_text(op: Operation) -> str:
    parts = []
    for disk in op.disks:
        total = disk.progress_total or 0
        pct = 100.0 * disk.progress_current / total if total else 0.0
        parts.append(f"disk {disk.name} copied {disk.progress_current / MIB:.1f} of {total / MIB:.1f} MiB "
                     f"({pct:.0f}%), job {disk.job_status or 'not started'}")
    return "; ".join(parts)
