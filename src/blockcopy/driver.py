"""Carries out the steps that :func:`blockcopy.protocol.decide` chooses: the only place where the
protocol touches the journal, QEMU and the file system.

The loop is: observe -> decide -> journal -> act -> wait. It keeps nothing between iterations
that the journal or QEMU cannot give back, so a new process resumes exactly where a killed one
stopped. The driver owns a few record fields that are measurements, not decisions (progress, the
STOP/RESUME timestamps, ``ready_at``); it carries them into every record it saves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import os
import time
from collections.abc import Callable, Iterable

from blockcopy import faults, images
from blockcopy.errors import BlockcopyError, QemuGone
from blockcopy.journal import Journal
from blockcopy.monitor import CommandRefused, Monitor
from blockcopy.protocol import Command, Failure, Observation, Wait, decide, needs
from blockcopy.records import Operation, Phase, Stage
from blockcopy.writeback import Writeback

log = logging.getLogger(__name__)

#: A transition that QEMU should finish by itself (complete -> pending takes ~8 ms) is given up on
#: after this long; the state machine then rolls back instead of leaving a guest paused.
SETTLE_TIMEOUT = 30.0
#: How often progress is written to the journal while copying (for `status` from other processes).
PROGRESS_SAVE_INTERVAL = 2.0


class Until(enum.Enum):
    """How long :meth:`Driver.run` keeps going."""

    STARTED = "started"  # return at the first long wait (the mirror is copying)
    READY = "ready"  # return once every job is ready (or the operation ended)
    DONE = "done"  # return only when the operation has ended


ProgressCallback = Callable[[Operation], None]


class Interrupted(BlockcopyError):
    """The user interrupted a wait for the copy; the job itself keeps running in QEMU."""

    exit_code = 130


class Driver:
    def __init__(self, journal: Journal, monitor: Monitor | None, *,
                 on_progress: ProgressCallback | None = None, poll_interval: float = 1.0,
                 interrupt: asyncio.Event | None = None) -> None:
        self.journal = journal
        self.interrupt = interrupt
        self.monitor = monitor
        self.on_progress = on_progress
        self.poll_interval = poll_interval
        self._writeback: asyncio.Task[None] | None = None

    async def run(self, op: Operation, until: Until) -> Operation:
        try:
            return await self._run(op, until)
        finally:
            self._stop_writeback()

    def _writeback_while_copying(self, op: Operation) -> None:
        """Sync the destinations from outside while the mirror fills them (see writeback.py)."""
        copying = op.phase is Phase.COPYING and op.ready_at is None
        if copying and self._writeback is None:
            self._writeback = asyncio.create_task(Writeback(d.dest_path for d in op.disks).run())
        elif not copying:
            self._stop_writeback()

    def _stop_writeback(self) -> None:
        if self._writeback is not None:
            self._writeback.cancel()
            self._writeback = None

    async def _run(self, op: Operation, until: Until) -> Operation:
        failure: Failure | None = None
        identical: tuple[bool, ...] | None = None
        settle_phase, settle_since = op.phase, time.monotonic()
        last_progress_save = 0.0
        while True:
            stalled = op.phase is settle_phase and time.monotonic() - settle_since > SETTLE_TIMEOUT
            seen = self.monitor.event_seq if self.monitor is not None else 0
            obs = await self._observe(op, failure, identical, stalled)
            op = self._measure(op, obs)
            step = decide(op, obs)
            if step.record is not None or step.commands:
                log.info("job %s [%s] %s", op.id, op.phase.value, step.note)
            if step.record is not None:
                op = self._save(step.record, op, step.note)
                last_progress_save = time.monotonic()  # the record carries the progress too
            op, failure, identical = await self._run_commands(step.commands, op)
            if step.terminal:
                return op
            if op.phase is not settle_phase:
                settle_phase, settle_since = op.phase, time.monotonic()
            self._writeback_while_copying(op)
            if step.wait is Wait.COPY:
                settle_since = time.monotonic()
                now = time.monotonic()
                if now - last_progress_save >= PROGRESS_SAVE_INTERVAL:
                    op = self.journal.save(op)
                    last_progress_save = now
                if self.on_progress is not None:
                    self.on_progress(op)
                if until is Until.STARTED or (until is Until.READY and op.ready_at is not None):
                    return op
                # Interrupts are honoured only here, never in the middle of a pivot.
                if self.interrupt is not None and self.interrupt.is_set():
                    raise Interrupted(f"stopped waiting; job {op.id} keeps running in QEMU")
                await self._wait(self.poll_interval, seen)
            elif step.wait is Wait.SETTLE:
                await self._wait(0.5, seen)

    async def _run_commands(self, commands: tuple[Command, ...], op: Operation
                            ) -> tuple[Operation, Failure | None, tuple[bool, ...] | None]:
        """Run a step's commands in order, stopping at the first refusal (the next observation
        shows where things stand). A run of the same job command for several jobs is independent
        by construction and goes to QEMU at once: fewer round trips while the guest is paused."""
        identical = None
        for batch in _batches(commands):
            if len(batch) > 1:
                assert self.monitor is not None
                results = await asyncio.gather(*(self.monitor.execute(c.name, c.args) for c in batch),
                                               return_exceptions=True)
                failure = None
                for command, result in zip(batch, results, strict=True):
                    if isinstance(result, QemuGone):
                        return op, failure, identical
                    if isinstance(result, CommandRefused):
                        log.info("%s refused: %s", command.describe(), result)
                        failure = failure or Failure(command, str(result))
                    elif isinstance(result, BaseException):
                        raise result
                    else:
                        faults.point(f"qmp:{command.name}")
                if failure is not None:
                    return op, failure, identical
                continue
            command = batch[0]
            try:
                op, result = await self._perform(command, op)
                identical = result or identical
            except (CommandRefused, images.ImageError, OSError) as exc:
                log.info("%s refused: %s", command.describe(), exc)
                return op, Failure(command, str(exc)), identical
            except QemuGone:
                return op, None, identical  # the next observation says so
            faults.point(f"qmp:{command.name}" if command.kind == "qmp" else command.kind)
            if command.after is not None:
                op = self._save(command.after, op, f"{command.describe()} done")
        return op, None, identical

    def _save(self, decided: Operation, current: Operation, note: str) -> Operation:
        return self.journal.save(_carry_measurements(decided, current), note)

    async def _observe(self, op: Operation, failure: Failure | None, identical: tuple[bool, ...] | None,
                       stalled: bool) -> Observation:
        dest_exists = tuple(d.stage is Stage.CREATE and os.path.lexists(d.dest_path) for d in op.disks)
        if self.monitor is None or not self.monitor.connected:
            return Observation(alive=False, identical=identical)
        obs = await self.monitor.observe(needs(op), dest_exists)
        return dataclasses.replace(obs, failure=failure, identical=identical, stalled=stalled)

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
        """Carry out one command; returns the record with any timestamps it produced."""
        if command.kind == "create-image":
            assert command.disk is not None
            disk = op.disks[command.disk]
            images.create(disk.dest_path, disk.dest_format, disk.virtual_size,
                          backing_file=disk.backing_file, backing_format=disk.backing_format)
            return op, None
        if command.kind == "sync-images":
            _sync_files(f for d in op.disks for f in (d.source_file, d.dest_path))
            return op, None
        if command.kind == "compare-images":
            return op, tuple(_same_data(d.source_file, d.source_format, d.dest_path, d.dest_format)
                             for d in op.disks)
        assert self.monitor is not None
        await self.monitor.execute(command.name, command.args)
        # QEMU emits STOP/RESUME before it answers, so the event time is known here.
        times = self.monitor.last_event_times
        if command.name == "stop" and "STOP" in times:
            op = dataclasses.replace(op, stop_ts=times["STOP"])
        elif command.name == "cont" and "RESUME" in times:
            op = dataclasses.replace(op, resume_ts=times["RESUME"])
        return op, None

    async def _wait(self, timeout: float, since: int) -> None:
        if self.monitor is not None and self.monitor.connected:
            await self.monitor.wait_event(timeout, since)


#: Job commands that may go to QEMU together when a step issues them for several jobs.
BATCHABLE = frozenset({"job-complete", "job-finalize", "job-cancel", "block-job-cancel"})


def _batchable(command: Command) -> bool:
    return command.kind == "qmp" and command.name in BATCHABLE and command.after is None


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


def _sync_files(paths: Iterable[str]) -> None:
    """fsync image files: the kernel writes their dirty pages, whoever wrote them (QEMU)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # not a local file (or gone): nothing to speed up
        try:
            os.fsync(fd)
        except OSError as exc:
            log.info("fsync %s: %s", path, exc)
        finally:
            os.close(fd)


def _same_data(src: str, src_fmt: str, dst: str, dst_fmt: str) -> bool:
    if not os.path.exists(dst):
        return False
    try:
        return images.compare(src, src_fmt, dst, dst_fmt)
    except images.ImageError:
        return False


def _carry_measurements(decided: Operation, current: Operation) -> Operation:
    disks = tuple(dataclasses.replace(d, progress_current=c.progress_current, progress_total=c.progress_total,
                                      job_status=c.job_status)
                  for d, c in zip(decided.disks, current.disks, strict=True))
    return dataclasses.replace(decided, disks=disks, ready_at=current.ready_at, stop_ts=current.stop_ts,
                               resume_ts=current.resume_ts, created_at=current.created_at)
