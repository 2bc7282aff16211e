"""Pure pieces of the driver: which commands may go to QEMU together."""

from __future__ import annotations

from blockcopy.driver import _batches
from blockcopy.protocol import Command, qmp


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


def test_the_observation_behind_finalize_goes_out_only_after_the_commands() -> None:
    """QEMU answers in order, so queries sent after the finalizes see their effect; the wait is on the
    client's count of queued messages (not on asyncio's scheduling), and ends if a command failed
    before it was written."""
    import asyncio
    from typing import Any

    from blockcopy.driver import Driver, Link
    from blockcopy.records import Goal, Operation, Phase

    class Wire:
        def __init__(self) -> None:
            self.messages_queued = 0
            self.waiters: list[tuple[int, asyncio.Future[None]]] = []

        def until_queued(self, count: int) -> asyncio.Future[None]:
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append((count, waiter))
            self.queue(0)
            return waiter

        def queue(self, n: int) -> None:
            self.messages_queued += n
            for count, waiter in self.waiters:
                if self.messages_queued >= count and not waiter.done():
                    waiter.set_result(None)

    wire = Wire()
    driver = Driver(journal=None, link=Link("/nonexistent", connect=None))  # type: ignore[arg-type]
    driver.link.monitor = wire  # type: ignore[assignment]
    seen: list[int] = []

    async def observe(*_args: Any) -> Any:
        seen.append(wire.messages_queued)
        return "observation"

    driver._observe = observe  # type: ignore[method-assign,assignment]
    op = Operation(id="x", domain="d", goal=Goal.PIVOT, phase=Phase.FINALIZING, disks=())

    async def two_finalizes() -> None:
        for _ in range(2):  # the library queues them a few loop turns later
            for _ in range(3):
                await asyncio.sleep(0)
            wire.queue(1)
        await asyncio.sleep(0.05)  # the replies

    async def refused_before_sent() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("refused")

    async def main() -> None:
        running = asyncio.ensure_future(two_finalizes())
        result: Any = await driver._observe_behind(running, 2, op, None)
        assert result == "observation"
        assert seen == [2] and not running.done(), "observed before both finalizes were on the wire"
        await running
        failing = asyncio.ensure_future(refused_before_sent())
        result = await asyncio.wait_for(driver._observe_behind(failing, 4, op, None), 1)
        assert result == "observation" and failing.done() and isinstance(failing.exception(), RuntimeError)

    asyncio.run(main())
