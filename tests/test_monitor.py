"""The QMP client's per-message costs, which count while a guest is paused (pure: no QEMU)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from qemu.qmp import Message

from blockcopy.monitor import LeanQMPClient, Monitor


class CountingMessage(Message):
    formatted = 0

    def __str__(self) -> str:
        CountingMessage.formatted += 1
        return super().__str__()


def test_execution_ids_are_short_and_unique() -> None:
    client = LeanQMPClient("t")
    ids = [client._get_exec_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert max(len(i) for i in ids) <= 4  # QEMU reads QMP input a byte at a time


def test_messages_are_formatted_only_when_debug_logging_prints_them(caplog: pytest.LogCaptureFixture) -> None:
    client = LeanQMPClient("t")
    msg = CountingMessage({"event": "STOP"})
    CountingMessage.formatted = 0
    with caplog.at_level(logging.INFO):
        assert client._cb_inbound(msg) is msg and client._cb_outbound(msg) is msg
    assert CountingMessage.formatted == 0
    with caplog.at_level(logging.DEBUG, logger=client.logger.name):
        client._cb_inbound(msg)
    assert CountingMessage.formatted >= 1 and '"STOP"' in caplog.text


def test_a_real_qemu_gets_short_ids_and_every_query_asked_for(vm_factory) -> None:
    """On the wire, against QEMU: the ids the library really sends (a renamed library hook would
    silently bring back long ones), and the queries of a full observation, answered in order."""
    vm = vm_factory(1, size=16 * 1024 * 1024, fill=False)
    sent: list[Message] = []

    class Recording(LeanQMPClient):
        def _cb_outbound(self, msg: Message) -> Message:
            sent.append(msg)
            return super()._cb_outbound(msg)

    async def run() -> None:
        client = Recording("t")
        await client.connect(str(vm.qmp_socket))
        monitor = Monitor(str(vm.qmp_socket), client, None)
        try:
            obs = await monitor.observe(frozenset({"status", "jobs", "block", "nodes"}))
        finally:
            await monitor.close()
        assert obs.alive and obs.run_state == "running" and obs.jobs == {}
        assert "vda-fmt" in obs.nodes and "/machine/peripheral/vda/virtio-backend" in obs.device_nodes

    asyncio.run(run())
    executes = [m for m in sent if "execute" in m and m["execute"] != "qmp_capabilities"]
    assert [m["execute"] for m in executes] == ["query-status", "query-jobs", "query-block",
                                                "query-named-block-nodes"]
    assert all(len(m["id"]) <= 2 for m in executes), [m["id"] for m in executes]


def test_every_task_waiting_on_one_connection_wakes_on_each_event(vm_factory) -> None:
    """The daemon's jobs of one domain share its connection: one task's wait must not take an
    event another task waits for (a review found a wait sleeping out its timeout while the event
    count had already passed its mark: the events sat in one queue that one reader emptied, and
    each command's end emptied it too). Real QEMU: `stop` and `cont` from another monitor give
    STOP and RESUME; three tasks, then two, wait for them at once."""
    vm = vm_factory(1, size=16 * 1024 * 1024, fill=False)

    async def run() -> tuple[int, int, int]:
        monitor = await Monitor.connect(str(vm.qmp_socket))
        try:
            since = monitor.event_seq
            waiters = [asyncio.ensure_future(monitor.wait_event(60, since)) for _ in range(3)]
            querier = asyncio.ensure_future(monitor.execute("query-status"))  # answered; events counted too
            await asyncio.sleep(0.05)
            await asyncio.to_thread(vm.cmd, "stop")
            await asyncio.wait_for(asyncio.gather(*waiters, querier), 20)  # not 60 s: each woke
            after_stop = monitor.event_seq
            again = [asyncio.ensure_future(monitor.wait_event(60, after_stop)) for _ in range(2)]
            await asyncio.to_thread(vm.cmd, "cont")
            await asyncio.wait_for(asyncio.gather(*again), 20)
            return since, after_stop, monitor.event_seq
        finally:
            await monitor.close()

    since, after_stop, end = asyncio.run(run())
    assert since < after_stop < end
    assert vm.run_state() == "running"


def test_closing_the_connection_ends_the_waits_on_it(vm_factory) -> None:
    """No event comes on a closed connection: a task waiting for one looks again at once instead of
    sleeping out its timeout (the caller reconnects)."""
    vm = vm_factory(1, size=16 * 1024 * 1024, fill=False)

    async def run() -> bool:
        monitor = await Monitor.connect(str(vm.qmp_socket))
        waiter = asyncio.ensure_future(monitor.wait_event(60, monitor.event_seq))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await monitor.close()
        await asyncio.wait_for(waiter, 20)  # not 60 s
        return monitor.connected

    assert asyncio.run(run()) is False
