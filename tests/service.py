"""A real ``blockcopy serve`` process for the service tests, and a raw HTTP client for it.

The tests' client is the standard library's ``http.client``, not the CLI's own (which speaks the
little HTTP it needs over the socket module, to start fast): two readings of the same replies."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockcopy.service.client import read_events


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a unix socket (the daemon's API)."""

    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def detail(self) -> str:
        return str(self.body.get("detail", "")) if isinstance(self.body, dict) else ""


class Served:
    """``blockcopy serve`` on a private state directory; ``kill9``, ``restart`` and raw ``call``s."""

    def __init__(self, state_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.state_dir = state_dir
        self.socket = state_dir / "run" / "blockcopy.sock"
        self.args = list(args)
        self.env = {**os.environ, "BLOCKCOPY_STATE_DIR": str(state_dir), **(env or {})}
        self.env.pop("BLOCKCOPY_CRASH_AT", None)
        self.log = state_dir.parent / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> Served:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "blockcopy", "serve", *self.args], env=self.env,
                                         stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"the daemon exited {self.proc.returncode}: {self.log.read_text()}"
            with contextlib.suppress(OSError, ValueError):
                if self.call("GET", "/v1/health", timeout=2).body["status"] == "ok":
                    return self
            assert time.monotonic() < deadline, f"the daemon did not start: {self.log.read_text()}"
            time.sleep(0.05)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def call(self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None,
             raw: bytes | None = None, timeout: float = 120.0) -> Reply:
        conn = UnixHTTPConnection(str(self.socket), timeout)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            try:
                payload = response.read()
            except http.client.IncompleteRead as exc:  # (not an OSError) the daemon died mid-answer
                raise ConnectionError(f"the daemon's answer was cut short: {exc!r}") from exc
            try:
                decoded = json.loads(payload) if payload else None
            except ValueError:
                decoded = payload.decode(errors="replace")
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, decoded)
        finally:
            conn.close()

    def ok(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        reply = self.call(method, path, body, **kwargs)
        assert reply.status < 300, f"{method} {path}: {reply.status} {reply.body}"
        return reply.body


@dataclass
class EventLog:
    """Follows ``GET /v1/events`` in a thread, reconnecting with ``Last-Event-ID`` whenever the
    stream breaks (the daemon was killed), until stopped."""

    served: Served
    events: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    reconnects: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> EventLog:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)

    def last(self) -> int:
        return self.events[-1][0] if self.events else 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for event in self._stream():
                    self.events.append(event)
            except (OSError, http.client.HTTPException, ValueError):
                pass
            self.reconnects += 1
            time.sleep(0.05)

    def _lines(self, response: http.client.HTTPResponse) -> Iterator[bytes]:
        while not self._stop.is_set() and (line := response.readline()):
            yield line

    def _stream(self) -> Iterator[tuple[int, str, dict[str, Any]]]:
        conn = UnixHTTPConnection(str(self.served.socket), 30.0)  # (the daemon sends a keepalive every 15 s)
        try:
            conn.request("GET", "/v1/events", headers={"Last-Event-ID": str(self.last())})
            response = conn.getresponse()
            if response.status != 200:
                return
            yield from read_events(self._lines(response))
        finally:
            conn.close()
