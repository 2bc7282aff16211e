"""Carries out the steps that :func:`blockcopy.protocol.decide` chooses: the only place where the
protocol touches the journal, QEMU and the file system.

The loop is: observe -> decide -> journal -> act -> wait. It keeps nothing between iterations
that the journal or QEMU cannot give back, so a new process resumes exactly where a killed one
stopped. The driver owns a few record fields that are measurements, not decisions (progress, the
STOP/RESUME timestamps, ``ready_at``); it carries them into every record it saves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from blockcopy import faults, images
from blockcopy.defaults import TRANSITION_TIMEOUT
from blockcopy.errors import (
    ConnectionLost,
    GuestLeftPaused,
    Interrupted,
    JournalError,
    MonitorError,
    MonitorTimeout,
    NoListener,
    QemuUnreachable,
    TransitionStalled,
)
from blockcopy.journal import Journal
from blockcopy.monitor import FDSET_OPAQUE_PREFIX, ON_QUEUED, CommandRefused, Monitor, fdset_path
from blockcopy.protocol import (
    MIGRATED_STATES,
    MIGRATION_BEGAN,
    MIGRATION_ENDED,
    SAVING_VM,
    Command,
    Failure,
    Observation,
    Wait,
    decide,
    in_page_cache_while_copying,
    needs,
)
from blockcopy.qemuproc import QemuProcess
from blockcopy.records import DiskRecord, Operation, Phase, Stage
from blockcopy.writeback import Writeback

log = logging.getLogger(__name__)

#: How often progress is written to the journal while copying (for `status` from other processes,
#: progress events, metrics). Each save is an fsynced commit, which may slow a mirror writing DEST
#: on the same device: in one experiment on libvirt's rig (README, Benchmarks), a daemon saving
#: every 1 s had a mirror phase 0.19 s longer than one saving every 2 s (median of per-rep
#: differences, 7 reps, 6 longer); weak evidence, and the reason the daemon uses this value too.
PROGRESS_SAVE_INTERVAL = 2.0
#: Phases in which a guest that blockcopy paused may still be paused (the outcome is not journaled).
_PAUSE_PHASES = frozenset({Phase.PIVOTING, Phase.FINALIZING, Phase.ABORTING, Phase.SETTLING})


def _mid_pivot(op: Operation) -> bool:
    """A pivot is under way: its run holds the domain's pivot guard."""
    return holds_guest(op) or op.phase in (Phase.PIVOTING, Phase.FINALIZING)


def holds_guest(op: Operation) -> bool:
    """The journal says blockcopy paused the guest for a pivot and has not resumed it yet."""
    return op.paused_by_us and not op.resumed and op.phase in _PAUSE_PHASES


def must_end_first(op: Operation) -> bool:
    """The guest may wait on this operation: blockcopy paused it for a pivot, or a pivot is under
    way, or a finish whose mirrors have not all been seen ending: a job of it may be `pending`
    (or turn so: a finish's soft-cancelled mirror does once it has copied what is left), when QEMU
    drains its source and the guest's writes to that disk wait until job-finalize. Such a run,
    once cancelled, goes on until this is false (the transition time limit bounds it), and
    recovery takes these right after the guests blockcopy holds paused. A finish's closing of
    DEST and its fsync hold nothing, and are not waited for."""
    if holds_guest(op) or op.phase in (Phase.PIVOTING, Phase.FINALIZING, Phase.ABORTING):
        return True  # (an abort may have pending jobs of a pivot it gave up to cancel)
    return op.phase is Phase.FINISHING and not all(d.mirror_ended for d in op.disks)


def recovery_order(op: Operation) -> tuple[bool, bool]:
    """Sort key: the guests blockcopy holds paused first, then what else may hold a guest
    (:func:`must_end_first`), then the rest; each run goes to its end before the next."""
    return not holds_guest(op), not must_end_first(op)


class Until(enum.Enum):
    """How long :meth:`Driver.run` keeps going."""

    STARTED = "started"  # return at the first long wait (the mirror is copying)
    READY = "ready"  # return once every job is ready (or the operation ended)
    DONE = "done"  # return only when the operation has ended


ProgressCallback = Callable[[Operation], None]


class Link:
    """The connection to one domain's QEMU, re-established when it drops, and the question every
    observation starts with: is the QEMU process an operation runs in still there?

    "Gone" means that process no longer exists (pid and start time, see :mod:`blockcopy.qemuproc`).
    A missing or refusing socket in front of a live process, or a different process behind the
    socket while the old one lives, is *unreachable*: nothing is decided then.
    """

    def __init__(self, socket_path: str, connect: Callable[[], Awaitable[Monitor]]) -> None:
        self.socket_path = socket_path
        self._connect = connect
        self.monitor: Monitor | None = None
        self.error: MonitorError | None = None  # why the last connection attempt failed
        # The daemon drives several jobs of a domain over one link: one connection attempt at a
        # time (QEMU serves one client per socket; a second attempt would wait for no greeting).
        self._opening = asyncio.Lock()

    async def open(self) -> Monitor | None:
        """Connect if not connected; None (and ``error``) when the socket does not answer."""
        async with self._opening:
            if self.monitor is not None and self.monitor.connected:
                return self.monitor
            await self.drop()
            try:
                self.monitor = await self._connect()
                self.error = None
            except MonitorError as exc:
                self.error = exc
            return self.monitor

    async def drop(self) -> None:
        if self.monitor is not None:
            await self.monitor.close()
            self.monitor = None

    @property
    def process(self) -> QemuProcess | None:
        return self.monitor.process if self.monitor is not None else None

    async def reach(self, op: Operation) -> Monitor | None:
        """The monitor of ``op``'s QEMU, or None when that QEMU is gone.

        :raise QemuUnreachable: the process lives but cannot be talked to now.
        :raise MonitorError: the socket fails for another reason and the operation does not say
            which process it runs in (journaled by an older blockcopy).
        """
        monitor = await self.open()
        expected = op.qemu
        if monitor is not None and (expected is None or expected.same_as(monitor.process)):
            return monitor
        if expected is None:  # an older record: the socket is all there is to go by
            if isinstance(self.error, NoListener):
                return None
            raise self.error or MonitorError(f"cannot reach QEMU at {self.socket_path}")
        state = expected.state()
        if state == "unknown":
            raise QemuUnreachable(f"cannot tell whether QEMU {expected} of job {op.id} still runs (blockcopy runs "
                                  "in another PID namespace, or /proc hides it); nothing was decided. Run blockcopy "
                                  "where it sees QEMU's process")
        if state == "gone":
            return None  # the process exited; whatever answers the socket now is another QEMU
        if monitor is not None:
            who = str(monitor.process) if monitor.process is not None else "a process blockcopy cannot see"
            raise QemuUnreachable(
                f"the QMP socket {self.socket_path} is now served by {who} while QEMU {expected} of job {op.id} "
                "still runs; nothing was decided. Give that QEMU its socket back")
        raise QemuUnreachable(f"QEMU {expected} of job {op.id} still runs, but its QMP socket {self.socket_path} "
                              f"does not answer ({self.error or 'no answer'})")


@dataclasses.dataclass
class DoneHere:
    """What this process did to QEMU for its jobs that the journal does not say (a crash forgets
    it). A Manager's drivers share one (the daemon has one Manager), so that a later run of a job
    (the daemon's retry, another call of the Python API) knows it as the run that did it."""

    #: the `once` commands sent, as (op id, command, args): never sent again. One counts as sent
    #: once it is queued: should the connection drop before QEMU read it, a later run does not send
    #: it either, and the step ends at the transition time limit (a pivot is then given up).
    once: set[tuple[str, str, str]] = dataclasses.field(default_factory=set)
    #: jobs whose pivot began here (PIVOTING journaled): every job-complete of it went out from
    #: here, so ``once`` knows them (see Driver._not_taken_yet)
    pivots: set[str] = dataclasses.field(default_factory=set)
    #: jobs first seen here already past COPYING (recovered after a crash): a pivot of theirs that
    #: went back to copying and begins again here may have had job-completes sent by the process
    #: before, so it is never counted in ``pivots``
    inherited: set[str] = dataclasses.field(default_factory=set)
    #: jobs journaled as "blockcopy pauses the guest" (paused_by_us) whose `stop` has not gone out:
    #: a guest found paused before it did was paused by someone else (Driver._completes_without_our_stop)
    stop_unsent: set[str] = dataclasses.field(default_factory=set)


class Driver:
    def __init__(self, journal: Journal, link: Link, *, on_progress: ProgressCallback | None = None,
                 poll_interval: float = 1.0, interrupt: asyncio.Event | None = None,
                 transition_timeout: float = TRANSITION_TIMEOUT, pivot_guard: asyncio.Lock | None = None,
                 progress_save_interval: float = PROGRESS_SAVE_INTERVAL, done_here: DoneHere | None = None) -> None:
        """``pivot_guard``: held from the step that begins a pivot to the end of the run, where
        several drivers share a domain (the daemon): two pivots must not pause and resume one guest
        in turn. (A command takes the domain's lock file for all it does instead.)

        ``done_here``: what this process did (see DoneHere); a Manager's, shared by its drivers.
        Default: this driver's own."""
        self.journal = journal
        self.pivot_guard = pivot_guard
        self.progress_save_interval = progress_save_interval
        self.interrupt = interrupt
        self.link = link
        self.on_progress = on_progress
        self.poll_interval = poll_interval
        self.transition_timeout = transition_timeout
        self._writeback: asyncio.Task[None] | None = None
        self._done = DoneHere() if done_here is None else done_here
        self._guarding = False  # this driver holds pivot_guard
        self._stopped = False  # the run was cancelled: a file step's thread that outlives it journals nothing

    @property
    def monitor(self) -> Monitor | None:
        return self.link.monitor

    async def run(self, op: Operation, until: Until) -> Operation:
        """Drive ``op`` until ``until``.

        :raise GuestLeftPaused: the guest that blockcopy paused for the pivot stays paused (the
            outcome could not be journaled, or QEMU stopped answering); ``recover`` finishes it.
        :raise TransitionStalled: QEMU did not carry out a finish or abort in time (a pivot past
            its point of no return that QEMU does not conclude raises GuestLeftPaused).
        :raise QemuUnreachable: QEMU runs but does not answer; nothing was decided.
        :raise JournalError: the journal could not be written (nothing was done for that step).
        :raise Interrupted: ``interrupt`` was set while waiting for a copy.

        Cancelling the calling task during a pivot, an abort, or a finish whose mirrors have not
        all ended does not stop it: it runs on until it holds nothing (:func:`must_end_first`; the
        transition time limit bounds it), then the cancellation goes on.
        """
        if op.phase in (Phase.PIVOTING, Phase.FINALIZING) and op.id not in self._done.pivots:
            self._done.inherited.add(op.id)
        task = asyncio.ensure_future(self._run_guarded(op, until))
        self._stopped = False
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._stopped = True
            told = False
            while not task.done() and must_end_first(self._last_saved(op)):
                if not told:
                    log.warning("job %s: cancelled during its pivot or finish, which may hold the guest (paused, "
                                "or its disk's writes waiting on a pending job): going on until it holds nothing",
                                op.id)
                    told = True
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait((task,), timeout=0.2)  # (looked at again as each record is saved)
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.warning("job %s: %s", op.id, task.exception())
            raise

    def _last_saved(self, op: Operation) -> Operation:
        try:
            return self.journal.get(op.id) or op
        except Exception:  # the journal cannot be read: the record in hand is the best there is
            return op

    async def _run_guarded(self, op: Operation, until: Until) -> Operation:
        self._guarding = False
        try:
            if _mid_pivot(op):
                await self._take_pivot_guard()  # a pivot resumed (after a crash or a failed run)
            return await self._run(op, until)
        except (JournalError, MonitorError, TransitionStalled) as exc:
            held = self._last_saved(op)
            if await self._guest_held(held):
                raise GuestLeftPaused(_held_message(held, exc, self.journal)) from exc
            raise
        finally:
            self._stop_writeback()
            if self._guarding and self.pivot_guard is not None:
                self.pivot_guard.release()
            self._guarding = False

    async def _take_pivot_guard(self) -> bool:
        """Hold the domain's pivot guard before a pivot begins. True when it had to wait for it:
        the world may have changed meanwhile, so the step must be decided again."""
        if self.pivot_guard is None or self._guarding:
            return False
        waited = self.pivot_guard.locked()
        await self.pivot_guard.acquire()
        self._guarding = True
        return waited

    async def _guest_held(self, op: Operation) -> bool:
        """Whether the guest may be paused by blockcopy with no outcome journaled."""
        if not holds_guest(op):
            return False
        monitor = self.link.monitor
        if monitor is None or not monitor.connected or (op.qemu is not None and not op.qemu.same_as(monitor.process)):
            return True  # cannot look at the job's own QEMU: say so rather than claim it runs
        try:
            return await asyncio.wait_for(monitor.run_state(), 2.0) != "running"
        except (MonitorError, TimeoutError):
            return True

    def _writeback_while_copying(self, op: Operation) -> None:
        """Sync the destinations from outside while the mirror fills them (see writeback.py)."""
        copying = op.phase is Phase.COPYING and op.ready_at is None
        if copying and self._writeback is None:
            # (a speed change starts a new run of the driver, and with it a new writeback)
            buffered = [d for d in op.disks if in_page_cache_while_copying(op, d)]
            if not buffered:
                return
            in_place = [d.dest_path for d in buffered if op.reuse_external or d.preallocation in ("falloc", "full")]
            files = Writeback((d.dest_path for d in buffered), in_place=in_place, bandwidth=op.bandwidth)
            self._writeback = asyncio.create_task(files.run())
        elif not copying:
            self._stop_writeback()

    def _stop_writeback(self) -> None:
        if self._writeback is not None:
            self._writeback.cancel()
            self._writeback = None

    async def _observe_behind(self, running: asyncio.Future[Any], queued: asyncio.Future[None], op: Operation,
                              identical: tuple[bool, ...] | None
                              ) -> tuple[Observation, tuple[Monitor, int] | None]:
        """Observe once every message of this step's commands is queued for QEMU (``queued``: the
        library writes its queue in order, and QEMU answers in that order), or once they have run
        (one failed before it was queued, the connection changed): never ahead of them.

        Also returns the connection and how many of its events had arrived just before the queries
        went out (None if the connection changed meanwhile): an event counted later may be news to
        this observation (the jobs turned `pending` after QEMU answered it), so a wait after it
        must wake on any such event, not only on those after the wait began."""
        if not running.done():
            await asyncio.wait((queued, running), return_when=asyncio.FIRST_COMPLETED)
        monitor = self.monitor
        seen = monitor.event_seq if monitor is not None else 0
        obs = await self._observe(op, None, identical, False)
        return obs, ((monitor, seen) if monitor is not None and self.monitor is monitor else None)

    async def _run(self, op: Operation, until: Until) -> Operation:
        failure: Failure | None = None
        identical: tuple[bool, ...] | None = None
        # The transition clock: reset whenever a step makes progress (a record, or commands other
        # than the previous step's), so only time spent *waiting* for QEMU counts.
        progress_at = time.monotonic()
        previous_commands: tuple[Command, ...] = ()
        last_progress_save = 0.0
        told = ""  # the last reason for a wait that was logged (a wait other than plain copying)
        # an observation sent right behind the commands, and the events counted before it went out
        ahead: asyncio.Task[tuple[Observation, tuple[Monitor, int] | None]] | None = None
        while True:
            guard = self.pivot_guard
            if guard is not None and not self._guarding and guard.locked():
                # Another job of the domain pivots: its guest is paused, and every QMP message on the
                # shared connection would lengthen that pause (and confuse its pipelining).
                async with guard:
                    pass
            stalled = time.monotonic() - progress_at > self.transition_timeout
            counted_on = self.monitor
            seen = counted_on.event_seq if counted_on is not None else 0
            if ahead is not None and failure is None:
                early, counted = await ahead
                obs = dataclasses.replace(early, stalled=stalled)
                # (None: it reconnected; then any event of the new connection is news to it)
                counted_on, seen = (None, 0) if counted is None else counted
            else:
                if ahead is not None:  # a command was refused: read what QEMU says after that
                    await ahead  # (an observation that failed ends the run as any other does)
                obs = await self._observe(op, failure, identical, stalled)
            ahead = None
            was_ready = op.ready_at is not None
            op = self._measure(op, obs)
            if op.ready_at is not None and not was_ready and op.phase is Phase.COPYING:
                op = self.journal.save(op)  # now, not with the next progress save: apps wait for "ready"
                last_progress_save = time.monotonic()
            step = decide(op, obs)
            if (step.record is not None and step.record.phase is Phase.PIVOTING and op.phase is not Phase.PIVOTING
                    and await self._take_pivot_guard()):
                continue  # another job of the domain pivoted meanwhile: observe again
            if step.record is not None or step.commands:
                log.info("job %s [%s] %s", op.id, op.phase.value, step.note)
            elif step.wait is Wait.COPY and step.note not in ("copying", told):
                log.info("job %s [%s] %s", op.id, op.phase.value, step.note)  # e.g. a memory dump holds the pivot
            if step.wait is Wait.COPY:
                told = step.note
            if step.stuck is not None:
                raise TransitionStalled(step.stuck)
            if step.record is not None:
                op = self._save(step.record, op, step.note)
                last_progress_save = time.monotonic()  # the record carries the progress too
            commands = await self._not_taken_yet(op, self._not_sent_yet(op, step.commands))
            op = self._completes_without_our_stop(op, commands)
            if step.observe_at_once and commands and not faults.serial():
                # QEMU answers in order: queries sent right behind the commands see their effect.
                queued: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                running = asyncio.ensure_future(self._run_counted(commands, op, queued))
                ahead = asyncio.ensure_future(self._observe_behind(running, queued, op, identical))
                try:
                    op, failure, identical = await running
                except BaseException:
                    ahead.cancel()
                    ahead.add_done_callback(_retrieved)
                    raise
            else:
                op, failure, identical = await self._run_commands(commands, op)
            if step.record is not None or (step.commands and step.commands != previous_commands):
                progress_at = time.monotonic()
            if step.commands:  # a wait in between does not make the same commands new again
                previous_commands = step.commands
            wait = step.wait
            if step.commands and not commands and wait is None:
                wait = Wait.SETTLE  # each was sent already (`once`): QEMU has yet to act on them
            if ahead is not None and failure is None:
                wait = None  # the observation behind the commands comes next; it decides any wait
            if step.terminal:
                return op
            self._writeback_while_copying(op)
            if wait is Wait.COPY:
                progress_at = time.monotonic()
                now = time.monotonic()
                if now - last_progress_save >= self.progress_save_interval:
                    op = self.journal.save(op)
                    last_progress_save = now
                if self.on_progress is not None:
                    self.on_progress(op)
                if until is Until.STARTED or (until is Until.READY and op.ready_at is not None):
                    return op
                # Interrupts are honoured only here, never in the middle of a pivot.
                if self.interrupt is not None and self.interrupt.is_set():
                    self.interrupt.clear()  # one interrupt stops one wait
                    raise Interrupted(f"stopped waiting; job {op.id} keeps running in QEMU")
                await self._wait(self.poll_interval, seen, counted_on)
            elif wait is Wait.SETTLE:
                await self._wait(0.5, seen, counted_on)

    async def _not_taken_yet(self, op: Operation, commands: tuple[Command, ...]) -> tuple[Command, ...]:
        """``commands`` without a job-complete that QEMU has taken already, for a mirror that
        replaces a node below filters (QEMU 7.2 aborts on a second one: Monitor.complete_taken).
        Asked only in a pivot that did not begin in this process (a recovery after a crash): in
        one that did, every complete went out from here and `_not_sent_yet` knows. Asked only of a
        guest that does not run: the question drains every disk and flushes the replaced image,
        which `sync-images` and `stop` keep short; in a step that pauses the guest first, such a
        complete is held back and asked about by the next step. A complete QEMU has counts as sent;
        the step then waits for QEMU to act on it (the job leaves `ready` once it has copied what is
        left), within the transition time limit. A connection that fails while asking holds the
        command back; the next observation says what happened."""
        if op.id in self._done.pivots or self.monitor is None:
            return commands
        pausing = any(c.name == "stop" for c in commands)
        kept: list[Command] = []
        for command in commands:
            disk = op.disks[command.disk] if command.disk is not None else None
            if command.name == "job-complete" and disk is not None and disk.replaces:
                if pausing:
                    continue
                log.info("job %s: does QEMU have a job-complete of %s already (a pivot this process did not "
                         "begin)?", op.id, disk.job_id)
                try:
                    taken = await self.monitor.complete_taken(disk.replaces)
                except (MonitorTimeout, ConnectionLost) as exc:
                    log.info("job %s: could not ask whether QEMU has the job-complete of %s: %s", op.id,
                             disk.job_id, exc)
                    continue
                if taken:
                    log.info("job %s: QEMU has the job-complete of %s already: not sent again", op.id, disk.job_id)
                    self._done.once.add(_once_key(op, command))
                    continue
            kept.append(command)
        return tuple(kept)

    def _not_sent_yet(self, op: Operation, commands: tuple[Command, ...]) -> tuple[Command, ...]:
        """The step's commands without the `once` commands this process already sent (see
        :meth:`_send`)."""
        return tuple(c for c in commands if not (c.once and _once_key(op, c) in self._done.once))

    async def _send(self, monitor: Monitor, command: Command, op: Operation) -> Any:
        """``monitor.execute`` of a QMP command. A `once` command counts as sent from the moment its
        message is queued for QEMU, whatever becomes of it: QEMU may have it. One that never got
        that far (the connection was gone) is sent again by a later step."""
        if not command.once:
            return await monitor.execute(command.name, command.args)
        key, step = _once_key(op, command), ON_QUEUED.get()

        def queued() -> None:
            self._done.once.add(key)
            if step is not None:
                step()

        token = ON_QUEUED.set(queued)
        try:
            return await monitor.execute(command.name, command.args)
        finally:
            ON_QUEUED.reset(token)

    async def _run_counted(self, commands: tuple[Command, ...], op: Operation, queued: asyncio.Future[None]
                           ) -> tuple[Operation, Failure | None, tuple[bool, ...] | None]:
        """:meth:`_run_commands`, with ``queued`` done once every QMP message of these commands is
        queued for QEMU. Only this task's own messages count (a context variable): the daemon's
        other jobs and requests share the connection."""
        expected, count = _messages(commands), 0

        def one_more() -> None:
            nonlocal count
            count += 1
            if count >= expected and not queued.done():
                queued.set_result(None)

        token = ON_QUEUED.set(one_more)
        try:
            return await self._run_commands(commands, op)
        finally:
            ON_QUEUED.reset(token)

    async def _run_commands(self, commands: tuple[Command, ...], op: Operation
                            ) -> tuple[Operation, Failure | None, tuple[bool, ...] | None]:
        """Run a step's commands in order, stopping at the first refusal (the next observation
        shows where things stand). A run of the same job command for several jobs is independent
        by construction and goes to QEMU at once: fewer round trips while the guest is paused.
        A command that QEMU does not answer, or a dropped connection, ends the step too: the next
        observation reconnects and reads what the command did."""
        identical = None
        batches = _batches(commands)
        while batches:
            batch = batches.pop(0)
            if batch[0].name == "stop" and batches and _completes_behind_stop(batches[0]):
                monitor = self.monitor
                if monitor is None:
                    return op, None, identical
                try:
                    op, failure, lost = await self._stop_then(monitor, op, batch[0], batches.pop(0))
                except (MonitorTimeout, ConnectionLost) as exc:  # before anything was journaled
                    log.info("stop: %s", exc)
                    return op, None, identical  # the next observation says what happened
                if failure is not None or lost:
                    return op, failure, identical
                continue
            if len(batch) > 1:
                monitor = self.monitor
                if monitor is None:
                    return op, None, identical
                failure, lost = await self._send_batch(monitor, op, batch)
                if failure is not None or lost:
                    return op, failure, identical
                continue
            command = batch[0]
            try:
                op, result = await self._perform(command, op)
                identical = result or identical
            except _Refused as exc:
                log.info("%s refused: %s", command.describe(), exc.cause)
                return exc.op, Failure(command, str(exc.cause)), identical
            except (CommandRefused, images.ImageError, OSError) as exc:
                log.info("%s refused: %s", command.describe(), exc)
                return op, Failure(command, str(exc)), identical
            except (MonitorTimeout, ConnectionLost) as exc:
                log.info("%s: %s", command.describe(), exc)
                return op, None, identical  # the next observation says what happened
            faults.point(f"qmp:{command.name}" if command.kind == "qmp" else command.kind)
            if command.after is not None:
                op = self._save(command.after, op, f"{command.describe()} done")
        return op, None, identical

    def _save(self, decided: Operation, current: Operation, note: str) -> Operation:
        if decided.paused_by_us and decided.phase is not Phase.PIVOTING and decided.id in self._done.stop_unsent:
            # A pivot given up before its `stop` went out paused nothing: a guest paused now is
            # someone else's, not to be resumed by the abort's end.
            decided = dataclasses.replace(decided, paused_by_us=False)
        saved = self.journal.save(_carry_driver_facts(decided, current), note)
        if (saved.phase is Phase.PIVOTING and current.phase is not Phase.PIVOTING
                and saved.id not in self._done.inherited):
            self._done.pivots.add(saved.id)
        if saved.paused_by_us and not current.paused_by_us:
            self._done.stop_unsent.add(saved.id)
        elif not saved.paused_by_us:
            self._done.stop_unsent.discard(saved.id)
        return saved

    def _completes_without_our_stop(self, op: Operation, commands: tuple[Command, ...]) -> Operation:
        """The record to send ``commands`` with. A pivot journals that blockcopy pauses the guest
        (``paused_by_us``) before it looks at the guest again; when that look finds it paused
        already, the step is the job-completes alone and no `stop` of blockcopy's ever went out:
        someone else paused the guest in between (``virsh suspend``), and it is theirs to resume.
        Journaled before the completes go, as the look right before a `stop` does. Only this driver
        knows its `stop` is unsent: after a crash at that point the journal cannot tell this pause
        from blockcopy's own, and recovery resumes the guest (README: Known limits)."""
        if (op.id in self._done.stop_unsent and op.paused_by_us and any(c.name == "job-complete" for c in commands)
                and not any(c.name == "stop" for c in commands)):
            return self._not_ours_to_resume(op)
        return op

    async def _observe(self, op: Operation, failure: Failure | None, identical: tuple[bool, ...] | None,
                       stalled: bool) -> Observation:
        """What QEMU says now; ``alive=False`` once the operation's QEMU process is gone. A QEMU that
        lives but does not answer is retried for the transition time limit, then reported."""
        starting = [d for d in op.disks if d.stage in (Stage.CREATE, Stage.ADD)]
        states = iter(await asyncio.to_thread(lambda: [_dest_state(d) for d in starting]) if starting else [])
        dest_state = tuple(next(states) if d.stage in (Stage.CREATE, Stage.ADD) else "" for d in op.disks)
        deadline = time.monotonic() + self.transition_timeout
        while True:
            try:
                monitor = await self.link.reach(op)
                if monitor is None:
                    return Observation(alive=False, identical=identical)
                obs = await monitor.observe(needs(op), dest_state)
                return dataclasses.replace(obs, failure=failure, identical=identical, stalled=stalled)
            except (MonitorTimeout, ConnectionLost, QemuUnreachable) as exc:
                if time.monotonic() > deadline:
                    raise QemuUnreachable(f"{exc}. Job {op.id} stays as journaled ({op.phase.value}); nothing was "
                                          "decided. Run `blockcopy recover` once QEMU answers") from exc
                log.info("job %s: %s; trying again", op.id, exc)
                await self.link.drop()
                await asyncio.sleep(0.2)

    def _measure(self, op: Operation, obs: Observation) -> Operation:
        """Copy progress, job status and event timestamps into the record (not journaled here)."""
        if not obs.alive:
            return op
        for index, disk in enumerate(op.disks):
            job = obs.jobs.get(disk.job_id)
            if job is not None:
                op = op.with_disk(index, progress_current=job.current, progress_total=job.total,
                                  job_status=job.status)
        if (op.ready_at is None and op.phase is Phase.COPYING
                and all(obs.jobs.get(d.job_id, None) is not None and obs.jobs[d.job_id].status == "ready"
                        for d in op.disks)):
            op = dataclasses.replace(op, ready_at=time.time())
        return op

    async def _perform(self, command: Command, op: Operation) -> tuple[Operation, tuple[bool, ...] | None]:
        """Carry out one command; returns the record with any facts it produced."""
        if command.kind == "create-image":
            assert command.disk is not None
            index = command.disk
            disk = op.disks[index]

            loop = asyncio.get_running_loop()

            async def save_identity(dev: int, ino: int) -> None:
                nonlocal op
                if self._stopped:  # this driver was cancelled while the thread made the image
                    raise images.ImageError("the job's driver was stopped before the image got its name")
                op = self.journal.save(op.with_disk(index, dest_dev=dev, dest_ino=ino),
                                       f"made the image for {disk.dest_path}")

            def journal_identity(dev: int, ino: int) -> None:
                # Before the file gets DEST's name: a crash after linking leaves a file that the
                # journal proves is ours, and recovery goes on with it. (Journaled on the loop's
                # thread, which owns the journal; this runs in the image's thread.)
                asyncio.run_coroutine_threadsafe(save_identity(dev, ino), loop).result()

            directory = (disk.dest_dir_dev, disk.dest_dir_ino) if disk.dest_dir_dev is not None and \
                disk.dest_dir_ino is not None else None
            # In a thread, as every file operation here: the daemon serves other domains meanwhile
            # (qemu-img, a preallocation, storage that hangs).
            try:
                await asyncio.to_thread(
                    images.create, disk.dest_path, disk.dest_format, disk.virtual_size, tag=f"{op.id}-{index}",
                    backing_file=disk.backing_file, backing_format=disk.backing_format,
                    mode=0o600 if disk.dest_mode is None else disk.dest_mode, owner=disk.dest_owner,
                    cluster_size=disk.cluster_size, preallocation=disk.preallocation,
                    directory_identity=directory, before_link=journal_identity)
            except (images.ImageError, OSError) as exc:
                raise _Refused(op, exc) from exc  # with the record the identity was journaled in
            return op, None
        if command.kind == "add-dest":
            assert command.disk is not None
            disk = op.disks[command.disk]
            if disk.dest_created and disk.dest_dev is not None and disk.dest_ino is not None:
                await asyncio.to_thread(images.forget_temp_name, disk.dest_path, f"{op.id}-{command.disk}",
                                        (disk.dest_dev, disk.dest_ino))
            await self._add_dest(disk, command.args)
            return op, None
        if command.kind == "sync-images":
            await asyncio.to_thread(_sync_files, [f for d in op.disks for f in (d.source_file, d.dest_path)])
            return op, None
        if command.kind == "sync-dest":
            assert command.disk is not None
            # raises OSError: the step's failure
            await asyncio.to_thread(fsync_image, op.disks[command.disk].dest_path)
            return op, None
        if command.kind == "compare-images":
            same = [await asyncio.to_thread(_same_data, d.source_file, d.source_format, d.dest_path, d.dest_format,
                                            d.virtual_size) for d in op.disks]
            return op, tuple(same)
        monitor = self.monitor
        if monitor is None:
            raise ConnectionLost(f"not connected to QEMU for {command.name}")
        if command.name == "stop":
            return await self._stop(monitor, op), None
        seen = monitor.event_seq
        await self._send(monitor, command, op)
        if command.name == "cont":
            op = dataclasses.replace(op, resume_ts=monitor.event_time_since("RESUME", seen))
        return op, None

    async def _stop_then(self, monitor: Monitor, op: Operation, stop_command: Command, completes: list[Command]
                         ) -> tuple[Operation, Failure | None, bool]:
        """``stop``, with the job-completes written right behind it: QEMU reads them as soon as the
        guest is paused, instead of a round trip later (the pause is the guest's stall). Whether the
        STOP was blockcopy's is read from the answer to ``stop`` as in :meth:`_stop_now` and
        journaled at once, before the completes' answers are read and before anything is decided
        (the observation sent behind the completes is decided on with that record): the jobs'
        completion does not depend on it (they are completed the same way whoever paused the
        guest), and a crash in between leaves the journal as a crash right after ``stop`` leaves it.

        QEMU 7.2 refuses ``stop`` only while a dump of the guest's memory runs. Such a dump pauses
        the guest itself (run state ``save-vm``, which COPYING waits out before a pivot), so a guest
        read running while a dump is active is one whose dump began between the two queries: the
        run-state query goes with ``query-dump``, and then ``stop`` goes alone (refused, the step is
        tried again after a wait, the jobs still ready). A dump that begins after both queries finds
        the job-completes behind the refused ``stop``: PIVOTING then gives the pivot up if the
        guest runs again by its next look.

        ``query-migrate`` goes with those two queries (outside the pause): a migration begun since
        the copy's last look, or switching over, sends nothing either (``MIGRATION_BEGAN``: PIVOTING
        goes back to COPYING, which waits it out).

        Returns the record, the first refusal, and whether the connection failed on the way (then
        the next observation says what happened).

        :raise MonitorTimeout, ConnectionLost: before anything was journaled (a ``stop`` sent
            alone during a dump may have reached QEMU)."""
        state, dumping, migration = await asyncio.gather(monitor.run_state(), monitor.dump_running(),
                                                         monitor.migration_status())
        held = _no_pause_now(state, migration)
        if held is not None:  # a dump or a migration since the last look: nothing is sent (PIVOTING goes back)
            return op, Failure(stop_command, held), False
        if state != "running":
            op = self._not_ours_to_resume(op)
            failure, lost = await self._send_batch(monitor, op, completes)
            return op, failure, lost
        if dumping:
            try:
                op = await self._stop_now(monitor, op)
            except CommandRefused as exc:
                log.info("stop refused: %s", exc)
                return op, Failure(stop_command, str(exc)), False
            failure, lost = await self._send_batch(monitor, op, completes)
            return op, failure, lost
        faults.point("run-state")
        seen, clock = monitor.event_seq, _Clock()
        loop = asyncio.get_running_loop()
        stop_queued: asyncio.Future[None] = loop.create_future()
        outer = ON_QUEUED.get()

        def queued() -> None:
            if outer is not None:
                outer()  # (the step's count of its messages, for the observation behind them)
            if not stop_queued.done():
                stop_queued.set_result(None)

        token = ON_QUEUED.set(queued)
        try:
            stop = asyncio.ensure_future(monitor.execute("stop"))
        finally:
            ON_QUEUED.reset(token)
        stop.add_done_callback(_retrieved)  # (read below; this only keeps asyncio from logging it as lost)
        await asyncio.wait((stop_queued, stop), return_when=asyncio.FIRST_COMPLETED)
        if stop_queued.done():
            self._done.stop_unsent.discard(op.id)  # (QEMU may have it now)
        if not stop_queued.done():  # it never got to QEMU (the connection was gone): raises
            try:
                await stop
            except CommandRefused as exc:  # (not from QEMU, which answers what it read)
                return op, Failure(stop_command, str(exc)), False
        completing = asyncio.ensure_future(self._send_all(monitor, op, completes))
        await asyncio.wait((stop,))
        try:
            stop.result()
        except (CommandRefused, MonitorTimeout, ConnectionLost) as exc:
            log.info("stop: %s", exc)
            _batch_answers(completes, await completing)  # (logged; the next observation shows the jobs)
            if isinstance(exc, CommandRefused):  # (a dump started since the query)
                return op, Failure(stop_command, str(exc)), False
            return op, None, True
        faults.point("qmp:stop")  # (the points in the order of QEMU's answers)
        stop_ts = _our_stop(monitor, seen, clock)
        op = self._not_ours_to_resume(op) if stop_ts is None else dataclasses.replace(op, stop_ts=stop_ts)
        failure, lost = _batch_answers(completes, await completing)
        return op, failure, lost

    async def _send_all(self, monitor: Monitor, op: Operation, batch: list[Command]) -> list[Any]:
        """Send a batch's commands together (QEMU runs them in order); each one's answer or error."""
        return await asyncio.gather(*(self._send(monitor, c, op) for c in batch), return_exceptions=True)

    async def _send_batch(self, monitor: Monitor, op: Operation, batch: list[Command]
                          ) -> tuple[Failure | None, bool]:
        """:meth:`_send_all`, read by :func:`_batch_answers`."""
        return _batch_answers(batch, await self._send_all(monitor, op, batch))

    async def _stop(self, monitor: Monitor, op: Operation) -> Operation:
        """Pause the guest for the pivot, ``stop`` alone (while a test has a fault armed, or when the
        step's job-completes were sent already). A guest that someone else paused since blockcopy's
        last look is theirs to resume, not blockcopy's: that is journaled before the jobs are
        completed (see :func:`_our_stop`).

        :raise CommandRefused: a memory dump holds the guest paused, or a migration runs or took the
            guest (nothing was sent: PIVOTING goes back to COPYING on the next look)."""
        state, migration = await asyncio.gather(monitor.run_state(), monitor.migration_status())
        held = _no_pause_now(state, migration)
        if held is not None:  # a dump or a migration since the last look: the step ends here (PIVOTING goes back)
            raise CommandRefused("stop", "GenericError", held)
        if state != "running":
            return self._not_ours_to_resume(op)
        return await self._stop_now(monitor, op)

    async def _stop_now(self, monitor: Monitor, op: Operation) -> Operation:
        """``stop`` a guest just read running; its STOP's time, or the guest journaled as someone
        else's to resume.

        :raise CommandRefused: QEMU refused (a dump of the guest's memory runs).
        :raise MonitorTimeout, ConnectionLost: as :meth:`Monitor.execute`."""
        faults.point("run-state")
        seen, clock = monitor.event_seq, _Clock()
        self._done.stop_unsent.discard(op.id)  # (QEMU may have it from now on)
        await monitor.execute("stop")
        stop_ts = _our_stop(monitor, seen, clock)
        if stop_ts is None:
            return self._not_ours_to_resume(op)
        return dataclasses.replace(op, stop_ts=stop_ts)

    def _not_ours_to_resume(self, op: Operation) -> Operation:
        self._done.stop_unsent.discard(op.id)
        if not op.paused_by_us:
            return op
        warning = ("the guest was paused by someone else just before blockcopy's pause for the pivot: blockcopy "
                   "leaves it paused; resume it with QMP 'cont' (or virsh resume) if that was not intended")
        return self.journal.save(dataclasses.replace(op, paused_by_us=False, warnings=(*op.warnings, warning)),
                                 "the guest was paused by someone else just before: blockcopy will not resume it")

    async def _add_dest(self, disk: DiskRecord, args: Mapping[str, Any]) -> None:
        """blockdev-add DEST from a descriptor of the file the journal names (see
        images.open_identified), passed to QEMU in an fd set: QEMU never opens DEST by a path that
        someone could have swapped since it was checked.

        One read-write descriptor only: every open QEMU makes of ``/dev/fdset/N`` duplicates it, so
        they share one open file description and QEMU's image locks on it never conflict with each
        other (a second, read-only description in the set kept the shared locks of an earlier
        read-only open and made QEMU refuse its own write lock). So DEST is opened read-write
        (``auto-read-only`` is not carried), and a read-only disk's DEST stays open read-write after
        the pivot; the device still only reads."""
        monitor = self.monitor
        if monitor is None:
            raise ConnectionLost("not connected to QEMU for blockdev-add")
        if disk.dest_ino is None or disk.dest_dev is None:
            raise images.ImageError(f"the journal does not say which file {disk.dest_path} must be; refusing it")
        opening = asyncio.get_running_loop().run_in_executor(None, images.open_identified, disk.dest_path,
                                                             (disk.dest_dev, disk.dest_ino))
        try:
            fd = await asyncio.shield(opening)
        except asyncio.CancelledError:  # the descriptor the thread still returns must not leak (O_EXCL)
            opening.add_done_callback(_close_opened)
            raise
        try:
            fdset = await monitor.add_fd(fd, f"{FDSET_OPAQUE_PREFIX}{disk.dest_path}")
        finally:
            await asyncio.to_thread(os.close, fd)
        added = _opened_from(args, fdset_path(fdset))
        try:
            await monitor.execute("blockdev-add", added)
        except CommandRefused:
            with contextlib.suppress(MonitorError):
                await monitor.execute("remove-fd", {"fdset-id": fdset})
            raise

    async def _wait(self, timeout: float, since: int, counted_on: Monitor | None) -> None:
        """Wait for an event after number ``since`` of the connection ``counted_on``; on another
        connection (reconnected meanwhile, by this run or by another job on the daemon's shared
        link), for any event of that one."""
        monitor = self.monitor
        if monitor is not None and monitor.connected:
            await monitor.wait_event(timeout, since if monitor is counted_on else 0)
        else:
            await asyncio.sleep(min(timeout, 0.2))


def _close_opened(done: asyncio.Future[int]) -> None:
    if not done.cancelled() and done.exception() is None:
        os.close(done.result())


class _Refused(Exception):
    """A file step failed after it had journaled part of its work: the record it left."""

    def __init__(self, op: Operation, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.op = op
        self.cause = cause


def _opened_from(args: Mapping[str, Any], filename: str) -> dict[str, Any]:
    """``args`` with the protocol node (file or host_device, below any filters) opening ``filename``."""
    out = dict(args)
    if out.get("driver") in ("file", "host_device"):
        out["filename"] = filename
    elif isinstance(out.get("file"), Mapping):
        out["file"] = _opened_from(out["file"], filename)
    else:
        raise images.ImageError(f"DEST's blockdev-add has no protocol node: {dict(args)}")
    return out


def _held_message(op: Operation, cause: BaseException, journal: Journal) -> str:
    where = (f" (e.g. free space where the journal lives, {journal.path.parent})"
             if isinstance(cause, JournalError) else "")
    if op.outcome is not None:
        return (f"the guest of domain {op.domain} stays PAUSED: job {op.id} ended ({op.outcome}, authoritative "
                f"image: {op.authoritative}) but blockcopy could not resume the guest: {cause}. Fix the "
                f"cause{where}, then run `blockcopy recover`: it resumes the guest")
    return (f"the guest of domain {op.domain} stays PAUSED: blockcopy paused it to pivot job {op.id} and could "
            f"not finish: {cause}. It stays paused on purpose: resumed before the outcome is journaled, it could "
            f"write to an image the journal does not name. Fix the cause{where}, then run `blockcopy recover`: "
            "it finishes the pivot and resumes the guest")


def _dest_state(disk: DiskRecord) -> str:
    """What DEST's path names now, without following a symlink (see Observation.dest_state)."""
    try:
        st = os.lstat(disk.dest_path)
    except FileNotFoundError:
        return "absent"
    except OSError:
        return "foreign"
    if disk.dest_ino is None or (st.st_dev, st.st_ino) != (disk.dest_dev, disk.dest_ino):
        return "foreign"
    return "ours" if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode) else "foreign"


#: Job commands that may go to QEMU together when a step issues them for several jobs.
BATCHABLE = frozenset({"job-complete", "job-finalize", "job-cancel", "block-job-cancel"})


def _batch_answers(batch: list[Command], results: list[Any]) -> tuple[Failure | None, bool]:
    """The answers to a batch sent together: the first refusal, if any, and whether one went
    unanswered (a timeout or a lost connection: the answers after it are not read, the next
    observation says what happened).

    :raise BaseException: what a send raised otherwise."""
    failure = None
    for command, result in zip(batch, results, strict=True):
        if isinstance(result, MonitorTimeout | ConnectionLost):
            log.info("%s: %s", command.describe(), result)
            return failure, True
        if isinstance(result, CommandRefused):
            log.info("%s refused: %s", command.describe(), result)
            failure = failure or Failure(command, str(result))
        elif isinstance(result, BaseException):
            raise result
        else:
            faults.point(f"qmp:{command.name}")
    return failure, False


class _Clock:
    """The host's wall clock when blockcopy sends its ``stop``, and how far it stepped since.

    QEMU stamps its events with the wall clock (``g_get_real_time``). A step of that clock (ntpd or
    chrony stepping it, a leap second, ``date -s``, the host suspended) between the sending and the
    answer moves the offset between the wall clock and the monotonic one (a slew moves both)."""

    def __init__(self) -> None:
        self.sent_at = time.time()
        self._offset = self.sent_at - time.monotonic()

    def drift(self) -> float:
        """Seconds the wall clock stepped since ``sent_at`` (negative: back)."""
        return (time.time() - time.monotonic()) - self._offset


def _our_stop(monitor: Monitor, seen: int, clock: _Clock) -> float | None:
    """QEMU's time of the STOP that blockcopy's ``stop`` caused, or None: the guest was paused by
    someone else, between blockcopy's reading it running (``seen``: events counted by then) and its
    sending of ``stop`` (which then emits no STOP).

    Their STOP arrives before the answer to blockcopy's ``stop`` (QEMU sends in order), and after
    ``seen`` when they paused it after the run-state answer: counting events cannot tell it from
    blockcopy's. Its time can: QEMU cannot have run blockcopy's ``stop`` before blockcopy sent it
    (``clock.sent_at``, taken before sending). A STOP stamped earlier is theirs, with 2 us for
    QEMU's microseconds and the float's rounding (QEMU takes far longer to read a command), and
    less by as far as the wall clock stepped back meanwhile (a step forward cannot make blockcopy's
    STOP look early; an error in the offset, from this process being preempted between its two
    clock readings, only counts more STOPs as blockcopy's, as before 2026-11-27 evening: a guest
    resumed by mistake rather than one left paused for good). One that lands between the sending
    and QEMU's reading of blockcopy's ``stop`` cannot be told from one a moment after it, which QEMU
    answers without an event either: no client can tell those apart."""
    stop_ts = monitor.event_time_since("STOP", seen)
    if stop_ts is None:
        return None
    return stop_ts if stop_ts >= clock.sent_at + min(clock.drift(), 0.0) - 2e-6 else None


def _completes_behind_stop(batch: list[Command]) -> bool:
    """Job-completes that may be written right behind ``stop`` (see ``Driver._stop_then``); not
    while a test has a fault armed, so that a crash can fall between the two."""
    return all(c.kind == "qmp" and c.name == "job-complete" and c.after is None for c in batch) and not faults.serial()


def _batchable(command: Command) -> bool:
    # While a test has a fault armed, each command goes alone, so that a fault can fall between two.
    return command.kind == "qmp" and command.name in BATCHABLE and command.after is None and not faults.serial()


def _no_pause_now(state: str, migration: str) -> str | None:
    """Why the pivot's ``stop`` is not sent now, read from the look right before it, or None: a
    memory dump holds the guest (``save-vm``), or a migration runs or has stopped the guest here
    (the protocol then goes back to COPYING, which waits either out)."""
    if state == SAVING_VM:
        return "a memory dump holds the guest paused"
    if migration not in MIGRATION_ENDED or state in MIGRATED_STATES:
        return MIGRATION_BEGAN
    return None


def _messages(commands: tuple[Command, ...]) -> int:
    """How many QMP messages carrying out ``commands`` sends at most: one per QMP command, four for
    ``stop`` (the run-state, dump and migration queries first, see ``Driver._stop_then``), three for
    adding DEST (add-fd, blockdev-add, remove-fd after a refusal), none for other file work. An
    observation waits for that many: fewer sent only delays it to the step's end, never ahead of
    the commands."""
    return sum(4 if c.name == "stop" else 1 if c.kind == "qmp" else 3 if c.kind == "add-dest" else 0
               for c in commands)


def _once_key(op: Operation, command: Command) -> tuple[str, str, str]:
    return (op.id, command.name, repr(sorted(command.args.items())))


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Done callback of a task nobody awaits any more: its exception is read, not logged as lost."""
    if not task.cancelled():
        task.exception()


def _batches(commands: tuple[Command, ...]) -> list[list[Command]]:
    """Consecutive runs of the same batchable command; every other command alone, in order."""
    batches: list[list[Command]] = []
    for command in commands:
        previous = batches[-1][-1] if batches else None
        if previous is not None and _batchable(command) and _batchable(previous) and previous.name == command.name:
            batches[-1].append(command)
        else:
            batches.append([command])
    return batches


def fsync_image(path: str) -> None:
    """fsync an image file or block device: the kernel writes its dirty pages, whoever wrote them
    (QEMU). Opened without following a symlink and without blocking (a FIFO swapped in would block
    an open for reading); anything but a regular file or block device is refused."""
    fd = images.open_to_sync(path)
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise OSError(f"{path} is not an image file or block device")
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_files(paths: Iterable[str]) -> None:
    """fsync image files before `stop`, only to make its flush short: failures are not errors."""
    for path in paths:
        try:
            fsync_image(path)
        except OSError as exc:
            log.info("fsync %s: %s", path, exc)


def _same_data(src: str, src_fmt: str, dst: str, dst_fmt: str, size: int) -> bool:
    if not os.path.exists(dst):
        return False
    try:
        return images.compare(src, src_fmt, dst, dst_fmt, size=size)
    except images.ImageError:
        return False


def _carry_driver_facts(decided: Operation, current: Operation) -> Operation:
    """The decided record plus what only the driver knows: measurements (progress, event times) and
    the identity of the file it created for DEST (learned while carrying out the command; the
    protocol never changes it)."""
    disks = tuple(dataclasses.replace(d, progress_current=c.progress_current, progress_total=c.progress_total,
                                      job_status=c.job_status, dest_dev=c.dest_dev, dest_ino=c.dest_ino)
                  for d, c in zip(decided.disks, current.disks, strict=True))
    # A pivot sent back to copying paused nothing that stands: its stop's time would tell the next
    # pivot that its own `stop` went out (protocol._pivoting reads stop_ts so).
    back = decided.phase is Phase.COPYING
    return dataclasses.replace(decided, disks=disks, ready_at=current.ready_at,
                               stop_ts=None if back else current.stop_ts, resume_ts=None if back else current.resume_ts,
                               created_at=current.created_at, updated_at=current.updated_at)
