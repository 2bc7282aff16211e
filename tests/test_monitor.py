"""The QMP client's per-message costs, which count while a guest is paused (pure: no QEMU)."""

from __future__ import annotations

import logging

import pytest
from qemu.qmp import Message

from blockcopy.monitor import LeanQMPClient


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
