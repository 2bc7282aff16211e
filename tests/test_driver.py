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
