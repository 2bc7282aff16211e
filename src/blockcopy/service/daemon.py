"""The daemon's model: attached domains with one QMP link each, and one task per unfinished job.

Why a task per job: a job waits for its mirror for minutes or hours; the daemon must meanwhile
answer every other request, and notice at once when a job becomes ready or fails. Each task runs the
same :class:`~blockcopy.driver.Driver` as a command does, from the journaled record, until the job
ends; a changed goal (pivot, finish, abort, speed) is journaled, then the task is restarted from
the journal. Cancelling a task mid-pivot finishes the pivot first (see ``Driver.run``), so a restart
or a shutdown never abandons one.

Per domain: requests that plan or change a job take the domain's lock (one at a time, as the lock
file serialises commands); a pivot takes the domain's *pivot guard* from its first step to its
end, and other jobs of the domain wait at their next step meanwhile, so two pivots never pause and
resume one guest in turn. The daemon holds each attached domain's lock file for as long as it runs:
a blockcopy command without the daemon is refused on those domains (DomainBusy) instead of driving
the same jobs twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from blockcopy.defaults import COMMAND_TIMEOUT, TRANSITION_TIMEOUT
from blockcopy.driver import Driver, Link, ProgressCallback, Until, holds_guest, recovery_order
from blockcopy.errors import (
    BlockcopyError,
    DomainBusy,
    NotReady,
    UsageError,
)
from blockcopy.journal import Domain
from blockcopy.locking import DomainLock
from blockcopy.manager import Manager, refuse_concluded
from blockcopy.monitor import DeviceInfo, Monitor
from blockcopy.records import CopyRequest, Goal, Operation, Phase, withdrawn_note

log = logging.getLogger(__name__)

#: Events are kept this long (a client that reconnects later starts from the oldest kept).
EVENT_RETENTION = 30 * 86400.0
#: Threads for file steps (planning's checks, creating DEST, fsyncs, writeback).
FILE_THREADS = 64
#: A job whose task failed (QEMU unreachable, a transition stalled) is retried after this long,
#: doubling up to RETRY_MAX.
RETRY_FIRST, RETRY_MAX = 0.5, 10.0


class Hub:
    """One attached domain: its QMP link (kept open), its request lock, its pivot guard, its lock file."""

    def __init__(self, domain: Domain, connect: Callable[[str], Awaitable[Monitor]], file_lock: DomainLock) -> None:
        self._connect = connect
        self.link = self._new_link(domain.qmp_socket)
        self.lock = asyncio.Lock()
        self.pivot_guard = asyncio.Lock()
        self.file_lock = file_lock

    def _new_link(self, socket_path: str) -> Link:
        return Link(socket_path, lambda: self._connect(socket_path))

    async def follow(self, domain: Domain) -> Link:
        """The link to ``domain``'s socket (a re-attach may have changed it)."""
        if self.link.socket_path != domain.qmp_socket:
            await self.link.drop()
            self.link = self._new_link(domain.qmp_socket)
        return self.link

    async def close(self) -> None:
        await self.link.drop()
        self.file_lock.release()


class ResidentManager(Manager):
    """The manager inside the daemon: links stay open, a domain's requests are serialised in
    memory, and the job tasks, not the requests, drive unfinished jobs."""

    reconciles = False

    def __init__(self, daemon: Daemon, state_dir: Path | str | None, **options: float) -> None:
        super().__init__(state_dir, create_journal=True, **options)
        self.daemon = daemon

    @asynccontextmanager
    async def _exclusive(self, name: str) -> AsyncIterator[None]:
        while True:
            hub = self.daemon.hub(name)
            async with hub.lock:
                if self.daemon.hubs.get(name) is hub:  # (else detached and attached again meanwhile)
                    yield
                    return

    async def _open_link(self, domain: Domain) -> Link:
        link = await self.daemon.hub(domain.name).follow(domain)
        await link.open()
        return link

    async def _close_link(self, link: Link) -> None:
        pass  # kept for the next request and the job tasks

    def _driver(self, link: Link, on_progress: ProgressCallback | None = None) -> Driver:
        guard = next((h.pivot_guard for h in self.daemon.hubs.values() if h.link is link), None)
        # Progress is journaled (and so sent as an event) as often as without the daemon, every
        # driver.PROGRESS_SAVE_INTERVAL: each save is an fsync (the daemon used 1 s before).
        return Driver(self.journal, link, on_progress=on_progress, interrupt=None,
                      transition_timeout=self.transition_timeout, pivot_guard=guard, done_here=self.done_here)


def _withdrawal(stack: list[_Asked], token: str, goal: Goal) -> tuple[Goal, list[_Asked]] | None:
    """What the interrupted CLI wait of ``token`` leaves, the job's goal being ``goal``: (the goal to
    journal, the stack after), or None to change nothing (no wait of that token journaled the goal
    the job has, or another path changed the goal since: an app, a daemon restart). A wait below
    the top is marked withdrawn, and the goal stays; when the top one is withdrawn, the waits
    withdrawn below it go too: two interrupted waits leave what stood before both. Pure: the
    caller keeps the stack only once the goal is journaled."""
    mine = next((i for i, a in enumerate(stack) if a.token == token), None)
    if mine is None or stack[-1].goal is not goal:
        return None
    kept = [dataclasses.replace(a, withdrawn=a.withdrawn or i == mine) for i, a in enumerate(stack)]
    back = goal
    while kept and kept[-1].withdrawn:
        back = kept.pop().back
    return back, kept


@dataclasses.dataclass
class _Asked:
    """A goal that a CLI wait journaled through the daemon (``token``: its request's ``asked_by``)
    and the goal it replaced; ``withdrawn`` once that wait was interrupted."""

    token: str
    goal: Goal
    back: Goal
    withdrawn: bool = False


@dataclasses.dataclass
class TaskState:
    task: asyncio.Task[None]
    error: BlockcopyError | None = None  # why the last run stopped short of the job's end
    errors: int = 0  # how many runs did
    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # ends a retry delay


class Daemon:
    """Domains, job tasks and the journal's events, for :mod:`blockcopy.service.api`."""

    def __init__(self, state_dir: Path | str | None = None, *, qmp_timeout: float = 5.0,
                 command_timeout: float = COMMAND_TIMEOUT,
                 transition_timeout: float = TRANSITION_TIMEOUT) -> None:
        """:raise JournalError: the state directory or journal cannot be used."""
        self.hubs: dict[str, Hub] = {}
        self.manager = ResidentManager(self, state_dir, qmp_timeout=qmp_timeout, command_timeout=command_timeout,
                                       transition_timeout=transition_timeout)
        self.journal = self.manager.journal
        self.state_dir = self.manager.state_dir
        self.tasks: dict[str, TaskState] = {}
        self._background: list[asyncio.Task[None]] = []
        self.changed = asyncio.Condition()  # notified whenever the journal wrote events
        self.generation = 0  # counts those writes: a waiter compares it, so no notification is missed
        self.journal.on_events = self._journal_wrote
        # One event loop serves every domain: a checkpoint waits until no guest is paused for a pivot.
        self.journal.may_checkpoint = lambda domain: not any(h.pivot_guard.locked() for name, h in self.hubs.items()
                                                             if name != domain)
        self.closing = False
        self.streams_closed = False
        self.started_at = time.time()
        self.recovery_runs = 0  # runs of a job's driver at start and after a failed run
        # job id -> the goals that CLI waits journaled, in order (see _Asked): what keep-copying may
        # withdraw (forgotten at a restart: the goal then stays)
        self._asked: dict[str, list[_Asked]] = {}

    # --- life --------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Take every attached domain's lock file, then bring every unfinished job to where no guest
        is held paused (pivots under way are finished or rolled back) before serving anything, then
        follow each job in its own task. A domain whose lock file a command holds is adopted once
        the command ends; what stops one job's recovery is retried in the background."""
        # File steps run in threads; one that hangs on dead storage keeps its thread: room for many.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(FILE_THREADS, "blockcopy-files"))
        self.journal.prune_events(EVENT_RETENTION)
        self._background.append(asyncio.create_task(self._prune_events_daily()))
        busy = [domain.name for domain in self.journal.domains() if not self._take(domain.name)]
        unfinished = self.journal.operations(unfinished=True)
        for op in sorted(unfinished, key=recovery_order):
            if op.domain not in self.hubs:
                continue  # (adopted once recovery here is done)
            self.recovery_runs += 1
            try:
                async with self.hubs[op.domain].lock:
                    # A pivot under way runs to its end here (the run stops at the next copy wait).
                    await self.manager._driver(await self._link(op.domain)).run(op, Until.STARTED)
            except BlockcopyError as exc:
                log.warning("job %s: recovery at start: %s (retried in the background)", op.id, exc)
        for name in list(self.hubs):
            self._follow_domain(name)
        for name in busy:  # (only now: its jobs must not be recovered above and followed at once)
            self._background.append(asyncio.create_task(self._adopt(name)))

    def _take(self, name: str) -> bool:
        """Take the domain's hub; False while a command holds its lock file."""
        try:
            self.hub(name)
        except DomainBusy as exc:
            log.warning("%s; its jobs are followed once it is free", exc)
            return False
        return True

    async def _adopt(self, name: str) -> None:
        while not self.closing and self.journal.domain(name) is not None:
            try:
                self.hub(name)
            except DomainBusy:
                await asyncio.sleep(1.0)
                continue
            self._follow_domain(name)
            return

    async def _prune_events_daily(self) -> None:
        while not self.closing:
            await asyncio.sleep(86400.0)
            while not self.journal.may_checkpoint(None):  # not while a guest is paused for a pivot
                await asyncio.sleep(1.0)
            self.journal.prune_events(EVENT_RETENTION)

    async def close_streams(self) -> None:
        """End every event stream (the daemon stops): clients reconnect with their last event id."""
        self.streams_closed = True
        self.generation += 1
        async with self.changed:
            self.changed.notify_all()

    async def close(self) -> None:
        """Stop following jobs (a pivot under way is finished first) and close every link. The jobs
        keep running in QEMU; the next start follows them again."""
        self.closing = True
        for task in self._background:
            task.cancel()
        tasks = [state.task for state in self.tasks.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)  # (Driver.run finishes a pivot under way before it ends)
        for hub in self.hubs.values():
            await hub.close()
        self.hubs.clear()
        self.manager.close()

    def hub(self, name: str) -> Hub:
        """The domain's hub; its lock file is taken when the hub is made. :raise DomainBusy."""
        hub = self.hubs.get(name)
        if hub is None:
            lock = DomainLock(self.state_dir, name)
            lock.acquire()
            domain = self.journal.domain(name) or Domain(name, "", 0.0)
            hub = self.hubs[name] = Hub(domain, self.manager._connect, lock)
        return hub

    async def _link(self, name: str) -> Link:
        return await self.manager._open_link(self.manager._domain(name))

    def _journal_wrote(self) -> None:
        self.generation += 1

        async def notify() -> None:
            async with self.changed:
                self.changed.notify_all()

        with contextlib.suppress(RuntimeError):  # (no loop: a test's direct journal use)
            asyncio.get_running_loop().create_task(notify())

    # --- domains -----------------------------------------------------------------------------------

    async def attach(self, name: str, qmp_socket: str) -> Domain:
        """:raise UsageError, MonitorError, DomainBusy: as ``Manager.attach``."""
        known = name in self.hubs
        try:
            return await self.manager.attach(name, qmp_socket)
        finally:
            if not known and self.journal.domain(name) is None and name in self.hubs:
                await self.hubs.pop(name).close()

    async def detach(self, name: str) -> None:
        """:raise NotFound: unknown domain. :raise UsageError: it has unfinished jobs."""
        self.manager._domain(name)
        hub = self.hub(name)
        async with hub.lock:
            self.manager._refuse_unfinished(name, "detaching")
            self.journal.remove_domain(name)
            self.hubs.pop(name, None)
            await hub.close()

    async def disks(self, name: str) -> list[DeviceInfo]:
        return await self.manager.disks(name)

    # --- jobs --------------------------------------------------------------------------------------

    async def copy(self, request: CopyRequest, *, asked_by: str | None = None) -> tuple[Operation, bool]:
        """Plan and journal a copy; its task (the one owner of a job) starts it, and this returns
        once it has started (destinations made, mirrors running) or ended. Returns the job and
        whether it is new (False: ``request``'s request id had created it; nothing was started).

        :raise UsageError, RequestConflict, MonitorError, JournalError, DomainBusy: as ``Manager.copy``;
            or what stopped the start (the task retries it).
        """
        op, created = await self.manager.copy_or_replay(request, until=Until.STARTED)
        if created and asked_by is not None and request.goal in (Goal.PIVOT, Goal.FINISH):
            self._asked[op.id] = [_Asked(asked_by, request.goal, Goal.COPY)]
        self._follow(op.id)
        op = await self.wait_for(op.id, lambda o: o.phase is not Phase.STARTING or o.finished)
        return op, created

    async def conclude(self, op_id: str, goal: Goal, *, wait: bool, asked_by: str | None = None) -> Operation:
        """Journal ``goal`` (pivot, finish, abort) and have the job's task carry it out; return when
        the job has ended (a pivot or finish of a job that is not ready: refused unless ``wait``).

        :raise NotFound: unknown job. :raise UsageError: the job ended already, or is being aborted.
        :raise NotReady: not ready and not ``wait``. :raise OperationFailed: it ended failed.
        :raise TransitionStalled, GuestLeftPaused, MonitorError: what stopped the task's last run.
        """
        op = self.manager._operation(op_id)
        async with self.hub(op.domain).lock:
            op = self._concludable(op.id, goal)
            ready = all(d.job_status == "ready" for d in op.disks)
            if goal is not Goal.ABORT and not wait and not ready:
                raise NotReady(f"job {op.id} is not ready to {goal.value} yet; wait with `blockcopy "
                               f"{goal.value} {op.id} --wait` (API: ?wait=true)")
            await self._stop_following(op.id)
            op = self._concludable(op.id, goal)  # (its task may have ended it meanwhile)
            before = op.goal
            if op.goal is not goal:
                op = self.journal.save(op.with_goal(goal), f"{goal.value} requested")
            if asked_by is None:
                self._asked.pop(op.id, None)  # an app's (or an older client's) goal: nobody withdraws it
            elif before is not goal:  # (once journaled: the stack says what the journal holds)
                self._asked.setdefault(op.id, []).append(_Asked(asked_by, goal, before))
            self._follow(op.id)
        return await self.wait_end(op.id)

    def _concludable(self, op_id: str, goal: Goal) -> Operation:
        op = self.manager._operation(op_id)
        refuse_concluded(op, goal)
        return op

    async def keep_copying(self, op_id: str, *, asked_by: str | None = None) -> Operation:
        """Withdraw a pivot or finish that has not begun (a CLI wait interrupted): the job keeps
        copying. A pivot or finish under way runs to its end. ``asked_by``: only the goal that the
        request with that token journaled, and the goal it replaced is put back (a goal journaled
        before it, by an app or another command, stays; so does one after a daemon restart, which
        forgets the tokens). :raise NotFound."""
        op = self.manager._operation(op_id)
        async with self.hub(op.domain).lock:
            op = self.manager._operation(op.id)
            stack = self._asked.get(op.id, [])
            back: Goal
            kept: list[_Asked]
            if asked_by is None:  # (an older CLI: whatever pivot or finish stands, as before tokens)
                back, kept = Goal.COPY, []
            else:
                withdrawal = _withdrawal(stack, asked_by, op.goal)
                if withdrawal is None:
                    return op
                back, kept = withdrawal
            if op.phase is Phase.COPYING and op.goal in (Goal.PIVOT, Goal.FINISH) and op.goal is not back:
                await self._stop_following(op.id)
                op = self.manager._operation(op.id)
                if op.phase is Phase.COPYING and op.goal in (Goal.PIVOT, Goal.FINISH) and op.goal is not back:
                    op = self.journal.save(op.with_goal(back), withdrawn_note(back))
                    self._asked[op.id] = kept  # (once journaled: the stack says what the journal holds)
                self._follow(op.id)
            elif op.goal is back or op.finished:
                self._asked[op.id] = kept  # (nothing to journal: a later wait's goal stands, or it ended)
        return op

    async def set_speed(self, op_id: str, bandwidth_mib: float) -> Operation:
        """Journal a new speed limit (0: none); the job's task sends it to QEMU.

        :raise NotFound, UsageError: unknown job, one past its copy, a bad speed, QEMU refused it.
        """
        if not bandwidth_mib >= 0 or bandwidth_mib == float("inf"):
            raise UsageError(f"speed must be a number of MiB/s, 0 for unlimited, not {bandwidth_mib}")
        op = self.manager._operation(op_id)
        async with self.hub(op.domain).lock:
            self._speed_changeable(op.id)
            await self._stop_following(op.id)
            op = self._speed_changeable(op.id)
            op = self.journal.save(dataclasses.replace(op, bandwidth=round(bandwidth_mib * (1 << 20)),
                                                       speed_applied=False),
                                   f"speed {bandwidth_mib:g} MiB/s requested")
            self._follow(op.id)
        warnings = len(op.warnings)
        op = await self.wait_for(op.id, lambda o: o.speed_applied or o.finished)
        refused = [w for w in op.warnings[warnings:] if "could not change the speed" in w]
        if refused:
            raise UsageError(f"job {op.id}: QEMU refused the new speed ({refused[0]})")
        return op

    def _speed_changeable(self, op_id: str) -> Operation:
        op = self.manager._operation(op_id)
        if op.phase not in (Phase.STARTING, Phase.COPYING):
            raise UsageError(f"job {op.id} is {op.phase.value}: its speed can only change while it copies")
        return op

    async def recover(self, domain: str | None = None, *, wait: bool = False) -> list[Operation]:
        """Retry every unfinished job (of ``domain``) now instead of after its retry delay; returns
        them once no guest is held paused by one of them (``wait``: once every job with a pivot,
        finish or abort to carry out has ended)."""
        ops = self.journal.operations(domain=domain, unfinished=True)
        for name in sorted({op.domain for op in ops}):
            if name in self.hubs:
                async with self.hubs[name].lock:
                    self._follow_domain(name)
        for op in ops:
            state = self.tasks.get(op.id)
            if state is not None:
                state.wake.set()
        for op in ops:
            await self.wait_for(op.id, lambda o: not holds_guest(o) or o.finished)
            if wait and self.manager._operation(op.id).goal is not Goal.COPY:
                await self.wait_end(op.id)
        return [self.manager._operation(op.id) for op in ops]

    async def wait_end(self, op_id: str) -> Operation:
        """The job once it has ended. :raise BlockcopyError: what stopped its task meanwhile."""
        return await self.wait_for(op_id, lambda o: o.finished)

    async def wait_for(self, op_id: str, condition: Callable[[Operation], bool]) -> Operation:
        """The job once ``condition`` holds for its journaled record.

        :raise BlockcopyError: the job's task stopped short with an error (it retries later).
        """
        state = self.tasks.get(op_id)
        errors = state.errors if state is not None else 0
        while True:
            generation = self.generation
            op = self.manager._operation(op_id)
            if condition(op):
                return op
            state = self.tasks.get(op_id)
            if state is not None and state.errors > errors and state.error is not None:
                raise state.error
            if state is None or state.task.done():
                raise UsageError(f"job {op_id} is not followed by the daemon (it is {op.phase.value}); "
                                 "run `blockcopy recover`")
            await self.changes_since(generation, 0.5)

    async def changes_since(self, generation: int, timeout: float) -> int:
        """Wait until the journal has written events after ``generation`` (or ``timeout``); the
        generation now."""
        async with self.changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait_for(lambda: self.generation != generation), timeout)
        return self.generation

    def _follow(self, op_id: str) -> TaskState:
        """The job's one task: started unless one runs (two drivers must never act on one job)."""
        state = self.tasks.get(op_id)
        if state is not None and not state.task.done():
            return state
        new = TaskState(asyncio.create_task(self._drive(op_id), name=f"job {op_id}"))
        if state is not None:
            new.errors, new.error = state.errors, state.error
        self.tasks[op_id] = new
        return new

    def _follow_domain(self, name: str) -> None:
        for op in self.journal.operations(domain=name, unfinished=True):
            self._follow(op.id)

    async def _stop_following(self, op_id: str) -> None:
        """Cancel the job's task and wait until it has ended (a pivot under way runs to its end)."""
        state = self.tasks.get(op_id)
        if state is not None and not state.task.done():
            state.task.cancel()
            await asyncio.wait([state.task])  # (our own cancellation still propagates)

    def _failed(self, op_id: str, exc: BlockcopyError) -> None:
        state = self.tasks.get(op_id)
        if state is not None:
            state.error, state.errors = exc, state.errors + 1

    async def _drive(self, op_id: str) -> None:
        """Drive one job to its end, retrying (with a growing delay) whatever stops a run."""
        delay = RETRY_FIRST
        while not self.closing:
            op = self.journal.get(op_id)
            if op is None or op.finished:
                self._asked.pop(op_id, None)  # (no wait of it is left to withdraw anything)
                return
            try:
                link = await self._link(op.domain)
                await self.manager._driver(link).run(op, Until.DONE)
                delay = RETRY_FIRST
                continue
            except BlockcopyError as exc:
                self._failed(op_id, exc)
                log.warning("job %s: %s (retrying in %.1f s)", op_id, exc, delay)
            except Exception as exc:  # a defect: say so loudly, and keep following the job
                self._failed(op_id, BlockcopyError(f"internal error: {exc!r}"))
                log.exception("job %s: internal error (retrying in %.1f s)", op_id, delay)
            self.generation += 1  # (waiters look at the task's error)
            async with self.changed:
                self.changed.notify_all()
            state = self.tasks.get(op_id)
            if state is not None:
                state.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(state.wake.wait(), delay)
            delay = min(delay * 2, RETRY_MAX)
            self.recovery_runs += 1
