"""The CLI's side of the daemon: HTTP over its unix socket with the standard library only (a
command must start fast; FastAPI is the daemon's, not the client's).

:class:`DaemonClient` makes the requests and turns problem details back into the CLI's exceptions
(same message, same exit code); :class:`RemoteBackend` is the CLI's backend over it, returning the
same ``--json`` views the embedded backend does.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import socket
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from blockcopy import errors
from blockcopy.errors import BlockcopyError, Interrupted

#: ``blockcopy --no-daemon`` or this variable set to 1: never use the daemon.
NO_DAEMON_ENV = "BLOCKCOPY_NO_DAEMON"


def default_socket(state_dir: Path) -> Path:
    """``$BLOCKCOPY_SOCKET``, else ``run/blockcopy.sock`` in the state directory."""
    env = os.environ.get("BLOCKCOPY_SOCKET")
    return Path(env) if env else state_dir / "run" / "blockcopy.sock"


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


def error_from(status: int, body: Mapping[str, Any]) -> BlockcopyError:
    """The CLI's exception for a problem document (its class by name, else one with its exit code)."""
    detail = str(body.get("detail") or body.get("title") or f"HTTP {status}")
    kind = getattr(errors, str(body.get("error", "")), None)
    if isinstance(kind, type) and issubclass(kind, BlockcopyError):
        return kind(detail)
    exc = BlockcopyError(detail)
    exc.exit_code = int(body.get("exit_code", 1))
    return exc


class DaemonClient:
    def __init__(self, path: str, *, timeout: float | None = None) -> None:
        self.path = path
        self.timeout = timeout

    @classmethod
    def find(cls, socket_path: Path) -> DaemonClient | None:
        """The daemon listening on ``socket_path``, or None (no socket, or a dead daemon's)."""
        try:
            if os.environ.get(NO_DAEMON_ENV) == "1" or not socket_path.exists():
                return None
        except PermissionError:
            return None  # not this user's daemon: the command runs here (and says what it cannot open)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(str(socket_path))
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK, errno.EACCES):
                return None
            raise BlockcopyError(f"cannot reach the blockcopy daemon at {socket_path}: {exc.strerror}") from None
        finally:
            probe.close()
        return cls(str(socket_path))

    def call(self, method: str, path: str, body: Any = None, *, headers: Mapping[str, str] | None = None,
             query: Mapping[str, Any] | None = None) -> Any:
        """One request; the decoded JSON reply. :raise BlockcopyError: the daemon's error, as the CLI's."""
        if query:
            path += "?" + urllib.parse.urlencode({k: _q(v) for k, v in query.items() if v is not None})
        conn = UnixHTTPConnection(self.path, self.timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            raw = response.read()
        except OSError as exc:
            raise BlockcopyError(f"the blockcopy daemon at {self.path} did not answer: {exc}; its jobs go on. "
                                 "Run the command again (with --no-daemon if the daemon is stopped)") from None
        finally:
            conn.close()
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            decoded = None
        if response.status >= 400:
            raise error_from(response.status, decoded if isinstance(decoded, dict) else {})
        return decoded

    def events(self, after: int, job: str | None = None) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """Server-sent events from ``after`` on: (sequence number, kind, data), until the daemon
        closes the stream (it stops)."""
        query = urllib.parse.urlencode({k: v for k, v in (("after", after), ("job", job)) if v is not None})
        conn = UnixHTTPConnection(self.path, None)
        try:
            conn.request("GET", f"/v1/events?{query}", headers={"Accept": "text/event-stream"})
            response = conn.getresponse()
            if response.status >= 400:
                raise error_from(response.status, json.loads(response.read() or b"{}"))
            yield from read_events(response)
        finally:
            conn.close()


def read_events(lines: Iterable[bytes]) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """Server-sent events from a stream's lines: (sequence number, kind, data). Comments and the
    ``retry`` line are skipped; an event without data (none are sent) too."""
    seq, kind, data = 0, "", ""
    for raw in lines:
        line = raw.decode().rstrip("\n")
        if not line:
            if data:
                yield seq, kind, json.loads(data)
            seq, kind, data = 0, "", ""
        elif line.startswith("id:"):
            seq = int(line[3:].strip())
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()


def _q(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _option_text(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"{key}={'on' if value else 'off'}"
    return f"{key}={'default' if value is None else value}"


class RemoteBackend:
    """The CLI's commands through the daemon; every method returns the CLI's ``--json`` views."""

    def __init__(self, client: DaemonClient) -> None:
        self.client = client

    async def attach(self, name: str, qmp_socket: str) -> dict[str, Any]:
        return dict(self.client.call("POST", "/v1/domains", {"name": name, "qmp_socket": os.path.abspath(qmp_socket)}))

    async def detach(self, name: str) -> None:
        self.client.call("DELETE", f"/v1/domains/{_seg(name)}")

    async def domains(self) -> list[dict[str, Any]]:
        return list(self.client.call("GET", "/v1/domains"))

    async def disks(self, name: str) -> list[dict[str, Any]]:
        return list(self.client.call("GET", f"/v1/domains/{_seg(name)}/disks"))

    async def copy(self, request: Any, wait_until: str, on_progress: Callable[[Any], None] | None) -> dict[str, Any]:
        """``wait_until``: "started", "ready" or "done" (followed on the event stream)."""
        body: dict[str, Any] = {
            "domain": request.domain, "disks": [{"disk": d, "destination": p} for d, p in request.targets],
            "goal": request.goal.value, "format": request.format, "shallow": request.shallow,
            "reuse_external": request.reuse_external, "bandwidth_mib": request.bandwidth_mib,
            "buf_size": request.buf_size, "mode": request.mode,
            "dest_options": [_option_text(k, v) for k, v in request.dest_options.items()],
            "owner": {"uid": request.owner[0], "gid": request.owner[1]} if request.owner else None,
            "file_mode": request.mode_bits, "cluster_size": request.cluster_size,
            "preallocation": request.preallocation, "request_id": request.client_key}
        after = int(self.client.call("GET", "/v1/health")["last_event"])
        view = dict(self.client.call("POST", "/v1/jobs", {k: v for k, v in body.items() if v is not None}))
        if wait_until == "started" or view["outcome"] is not None:
            return view
        with self._interruptible(view["id"]):
            return self._follow(view, after, wait_until, on_progress)

    @contextlib.contextmanager
    def _interruptible(self, job: str) -> Iterator[None]:
        """Ctrl-C while waiting: as without the daemon, the wait's pivot or finish is withdrawn (one
        under way runs to its end) and the job keeps copying; exit 130."""
        try:
            yield
        except KeyboardInterrupt:
            self.client.call("POST", f"/v1/jobs/{_seg(job)}/keep-copying")
            raise Interrupted(f"stopped waiting; job {job} keeps running in QEMU") from None

    def _follow(self, view: dict[str, Any], after: int, wait_until: str,
                on_progress: Callable[[Any], None] | None) -> dict[str, Any]:
        """Follow the job's events until it is ready (``wait_until`` "ready") or has ended."""
        job = view["id"]
        if self._reached(view, wait_until):
            return view
        for _seq, kind, data in self.client.events(after, job):
            if kind == "progress" and on_progress is not None:
                on_progress(_progress_record(job, data["current"], data["total"], ready=False))
            if kind == "ready" and on_progress is not None:
                on_progress(_progress_record(job, 1, 1, ready=True))
            if kind in ("ready", "outcome", "state"):
                view = dict(self.client.call("GET", f"/v1/jobs/{_seg(job)}"))
                if self._reached(view, wait_until):
                    return view
        raise BlockcopyError(f"the blockcopy daemon stopped while job {job} was followed; the job goes on. "
                             f"`blockcopy status {job}` shows it")

    @staticmethod
    def _reached(view: Mapping[str, Any], wait_until: str) -> bool:
        return view["outcome"] is not None or (wait_until == "ready" and view["ready_at"] is not None)

    async def jobs(self, domain: str | None) -> list[dict[str, Any]]:
        return list(self.client.call("GET", "/v1/jobs", query={"domain": domain}))

    async def status(self, job: str, log: bool) -> dict[str, Any]:
        return dict(self.client.call("GET", f"/v1/jobs/{_seg(job)}", query={"log": log or None}))

    async def conclude(self, job: str, goal: str, wait: bool, on_progress: Callable[[Any], None] | None
                       ) -> dict[str, Any]:
        query = {"wait": True} if wait and goal != "abort" else None
        if goal == "abort":
            return dict(self.client.call("POST", f"/v1/jobs/{_seg(job)}/abort"))
        with self._interruptible(job):
            return dict(self.client.call("POST", f"/v1/jobs/{_seg(job)}/{goal}", query=query))

    async def recover(self, domain: str | None, wait: bool, on_progress: Callable[[Any], None] | None
                      ) -> list[dict[str, Any]]:
        return list(self.client.call("POST", "/v1/recover", query={"domain": domain, "wait": wait or None}))

    async def speed(self, job: str, bandwidth_mib: float) -> dict[str, Any]:
        return dict(self.client.call("POST", f"/v1/jobs/{_seg(job)}/speed", {"bandwidth_mib": bandwidth_mib}))

    def close(self) -> None:
        pass


def _seg(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _progress_record(job: str, current: int, total: int, *, ready: bool) -> Any:
    """What the progress bar reads of a record, from an event."""
    disk = SimpleNamespace(progress_current=current, progress_total=total)
    return SimpleNamespace(id=job, disks=[disk], ready_at=1.0 if ready else None)
