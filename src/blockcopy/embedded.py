"""The CLI's backend that runs a command in this process (no daemon): the manager, returning the
same ``--json`` views (:mod:`blockcopy.views`) as the daemon's client does."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blockcopy import nodes, views
from blockcopy.records import CopyRequest, Goal

if TYPE_CHECKING:
    from blockcopy.driver import ProgressCallback
    from blockcopy.manager import Manager


class EmbeddedBackend:
    """The commands run in this process (no daemon): the manager, returning ``--json`` views."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    async def attach(self, name: str, qmp_socket: str) -> dict[str, Any]:
        return views.domain_view(await self.manager.attach(name, qmp_socket))

    async def detach(self, name: str) -> None:
        self.manager.detach(name)

    async def domains(self) -> list[dict[str, Any]]:
        return [views.domain_view(d) for d in self.manager.domains()]

    async def disks(self, name: str) -> list[dict[str, Any]]:
        return [views.device_view(d) for d in await self.manager.disks(name)]

    async def copy(self, fields: dict[str, Any], wait_until: str, on_progress: ProgressCallback | None
                   ) -> dict[str, Any]:
        """``fields``: CopyRequest's, with the goal's value and ``--dest-option`` texts."""
        from blockcopy.driver import Until

        dest_options = nodes.parse_dest_options(fields["dest_options"])
        request = CopyRequest(**{**fields, "goal": Goal(fields["goal"]), "dest_options": dest_options})
        until = {"started": Until.STARTED, "ready": Until.READY, "done": Until.DONE}[wait_until]
        return views.operation_view(await self.manager.copy(request, until=until, on_progress=on_progress))

    async def jobs(self, domain: str | None) -> list[dict[str, Any]]:
        return [views.operation_view(op) for op in await self.manager.jobs(domain)]

    async def status(self, job: str, log: bool) -> dict[str, Any]:
        op = await self.manager.status(job)
        data = views.operation_view(op)
        if log:
            data["log"] = [{"at": at, "phase": phase, "note": note} for at, phase, note in self.manager.history(op.id)]
        return data

    async def conclude(self, job: str, goal: str, wait: bool, on_progress: ProgressCallback | None
                       ) -> dict[str, Any]:
        if goal == "abort":
            return views.operation_view(await self.manager.abort(job))
        method = self.manager.pivot if goal == "pivot" else self.manager.finish
        return views.operation_view(await method(job, wait=wait, on_progress=on_progress))

    async def recover(self, domain: str | None, wait: bool, on_progress: ProgressCallback | None
                      ) -> list[dict[str, Any]]:
        ops = await self.manager.recover(domain, wait=wait, on_progress=on_progress)
        return [views.operation_view(op) for op in ops]

    async def speed(self, job: str, bandwidth_mib: float) -> dict[str, Any]:
        return views.operation_view(await self.manager.set_speed(job, bandwidth_mib))

    def close(self) -> None:
        self.manager.close()
