"""Pieces of the driver: which commands may go to QEMU together, and what goes right behind them."""

from __future__ import annotations

import asyncio
from typing import Any

from conftest import VMFactory

from blockcopy.driver import Driver, Link, _batches
from blockcopy.monitor import Monitor
from blockcopy.protocol import Command, qmp
from blockcopy.records import Goal, Operation, Phase


def test_only_runs_of_the_same_job_command_are_batched() -> None:
    steps = (Command("sync-images"), qmp("stop"), qmp("job-complete", {"id": "a"}), qmp("job-complete", {"id": "b"}),
             qmp("job-finalize", {"id": "a"}), qmp("cont", after=None), qmp("cont"))
    assert [[c.name or c.kind for c in batch] for batch in _batches(steps)] == [
        ["sync-images"], ["stop"], ["job-complete", "job-complete"], ["job-finalize"], ["cont"], ["cont"]]


def test_commands_with_a_result_to_journal_run_alone() -> None:
    from blockcopy.records import Goal, Operation, Phase

    record = Operation(id="x", domain="d", goal=Goal.COPY, phase=Phase.STARTING, disks=())
    steps = (qmp("job-cancel", {"id": "a"}, after=record), qmp("job-cancel", {"id": "b"}))
    assert [len(batch) for batch in _batches(steps)] == [1, 1]


def test_once_commands_go_out_once_per_process() -> None:
    """A soft cancel sent again as the mirror leaves `ready` would be a hard one (issue 9 review)."""
    from blockcopy.driver import Driver, Link
    from blockcopy.records import Goal, Operation, Phase

    driver = Driver(journal=None, link=Link("/nonexistent", connect=None))  # type: ignore[arg-type]
    op = Operation(id="x", domain="d", goal=Goal.FINISH, phase=Phase.FINISHING, disks=())
    soft = qmp("block-job-cancel", {"device": "j0"}, once=True)
    other = qmp("block-job-cancel", {"device": "j1"}, once=True)
    plain = qmp("job-cancel", {"id": "j0"})
    assert driver._not_sent_yet(op, (soft, plain)) == (soft, plain)
    assert driver._not_sent_yet(op, (soft, other, plain)) == (other, plain)
    assert driver._not_sent_yet(op, (soft, other)) == ()


def test_the_observation_behind_the_commands_waits_for_the_steps_own_messages(vm_factory: VMFactory) -> None:
    """QEMU answers in order, so queries sent right behind a step's commands see their effect; but
    only the step's own messages count, not those of others who share the connection (the daemon's
    other jobs and requests): here another task sends queries the whole time. Real QEMU and
    qemu.qmp; the order is the one the client wrote to the socket."""
    vm = vm_factory(1)

    async def main() -> list[str]:
        monitor = await Monitor.connect(str(vm.qmp_socket))
        written: list[str] = []
        real = monitor._client._cb_outbound

        def outbound(msg: Any) -> Any:
            written.append(str(msg["execute"]))
            return real(msg)

        monitor._client._cb_outbound = outbound  # type: ignore[method-assign]
        driver = Driver(journal=None, link=Link(str(vm.qmp_socket), connect=None))  # type: ignore[arg-type]
        driver.link.monitor = monitor
        op = Operation(id="x", domain="d", goal=Goal.PIVOT, phase=Phase.FINALIZING, disks=())

        async def observe(*_args: Any) -> Any:
            await monitor.execute("query-name")  # stands for the observation's queries
            return "observation"

        driver._observe = observe  # type: ignore[method-assign,assignment]
        busy = True

        async def others() -> None:
            while busy:
                await monitor.execute("query-status")

        crowd = [asyncio.ensure_future(others()) for _ in range(3)]
        await asyncio.sleep(0.01)
        try:
            for _ in range(5):
                written.clear()
                queued: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                commands = (qmp("query-version"), qmp("query-kvm"), qmp("query-uuid"))
                running = asyncio.ensure_future(driver._run_commands(commands, op, queued))
                assert await driver._observe_behind(running, queued, op, None) == "observation"
                await running
                mine = [c for c in written if c != "query-status"]
                assert mine == ["query-version", "query-kvm", "query-uuid", "query-name"], written
            # A step whose command fails before it is sent: the observation goes out once it ended.
            failing = asyncio.ensure_future(driver._run_commands((qmp("no-such-command"), qmp("query-kvm")), op,
                                                                 never := asyncio.get_running_loop().create_future()))
            assert await asyncio.wait_for(driver._observe_behind(failing, never, op, None), 10) == "observation"
            assert failing.done() and not never.done()
            return written
        finally:
            busy = False
            await asyncio.gather(*crowd)
            await monitor.close()

    written = asyncio.run(main())
    assert "query-status" in written, "the other client's queries ran meanwhile"
