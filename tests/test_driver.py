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
