"""The CLI's side of the daemon: HTTP/1.1 over its unix socket, with nothing but the socket module.

A command through the daemon must start fast (issue 11: under 0.1 s from exec to the first QMP
command). Its start is almost all imports, and on the test machine ``http.client`` alone took
40-50 ms (it loads ``email`` and ``ssl``), ``h11`` about as much, ``pathlib`` 8 ms (one-off
readings of ``python -X importtime``). The daemon's
replies are simple (a JSON body with a Content-Length, or a chunked event stream), so the client
speaks the little HTTP it needs itself (:class:`Response`: HTTP/1.x replies framed by
Content-Length, by chunks, or by the end of the connection), and takes what it cannot frame as a
broken reply (an OSError); a success whose body is not a JSON object or list is an error too. The
service tests talk to the same daemon through ``http.client`` as well.

:class:`DaemonClient` makes the requests and turns problem details back into the CLI's exceptions
(same message, same exit code); :class:`RemoteBackend` is the CLI's backend over it, returning the
same ``--json`` views the embedded backend does.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import SimpleNamespace

from blockcopy import errors
from blockcopy.errors import BlockcopyError, Interrupted

TYPE_CHECKING = False  # (typing.TYPE_CHECKING, without loading typing: see blockcopy/__init__.py)
if TYPE_CHECKING:
    from typing import Any

#: ``blockcopy --no-daemon`` or this variable set to 1: never use the daemon.
NO_DAEMON_ENV = "BLOCKCOPY_NO_DAEMON"
#: The longest status line, header line, chunk-size line or event-stream line a reply may have
#: (the events the CLI follows, its own job's after its creation, are far shorter).
_LINE_MAX = 65536
#: The largest body the client reads: the daemon's longest reply, a list of every job, is a few MiB.
_BODY_MAX = 256 * 1024 * 1024


def default_socket(state_dir: str | os.PathLike[str]) -> str:
    """``$BLOCKCOPY_SOCKET``, else ``run/blockcopy.sock`` in the state directory."""
    return os.environ.get("BLOCKCOPY_SOCKET") or os.path.join(state_dir, "run", "blockcopy.sock")


class BadReply(ConnectionError):
    """The daemon's reply is not HTTP/1.1 as the client reads it (an OSError: the request failed)."""


class Response:
    """One HTTP/1.1 reply read from a socket: status, headers (names lower-cased) and a body framed
    by Content-Length, by chunks, or by the end of the connection (every request says
    ``Connection: close``)."""

    def __init__(self, sock: socket.socket) -> None:
        self._file = sock.makefile("rb")
        parts = self._line().split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not _digits(parts[1].decode("latin-1")):
            raise BadReply(f"not an HTTP/1.1 status line: {parts!r}")
        self.status = int(parts[1])
        if self.status < 200:  # (no request says Expect: an interim reply is not the daemon's)
            raise BadReply(f"unexpected interim reply {self.status}")
        self.headers: dict[str, str] = {}
        while (line := self._line()) not in (b"\r\n", b"\n"):
            name, sep, value = line.decode("latin-1").partition(":")
            if not line or not sep or name[:1].isspace():  # (the end of the reply, or a folded line)
                raise BadReply(f"the reply's head ends in {line!r}")
            self.headers[name.strip().lower()] = value.strip()
        coding = self.headers.get("transfer-encoding")
        if coding is not None and coding.lower() != "chunked":
            raise BadReply(f"unexpected Transfer-Encoding {coding!r}")
        self._chunked = coding is not None

    def read(self) -> bytes:
        """The whole body."""
        if self._chunked:
            joined = bytearray()
            for piece in self._chunks():
                joined += piece
                if len(joined) > _BODY_MAX:
                    raise BadReply("the reply's body is too long")
            return bytes(joined)
        length = self.headers.get("content-length")
        if length is None:
            rest = self._file.read(_BODY_MAX + 1)
            if len(rest) > _BODY_MAX:
                raise BadReply("the reply's body is too long")
            return rest
        if not _digits(length) or int(length) > _BODY_MAX:
            raise BadReply(f"bad Content-Length {length!r}")
        body = self._file.read(int(length))
        if len(body) != int(length):
            raise BadReply(f"the reply ended after {len(body)} of {length} bytes")
        return body

    def lines(self) -> Iterator[bytes]:
        """The body line by line as it arrives (an event stream), each with its newline."""
        parts = self._chunks() if self._chunked else iter(lambda: self._file.read1(_LINE_MAX), b"")
        pending = b""
        for part in parts:
            pending += part
            *complete, pending = pending.split(b"\n")
            yield from (line + b"\n" for line in complete)
            if len(pending) > _LINE_MAX:
                raise BadReply("a line of the event stream is too long")
        if pending:
            yield pending

    def close(self) -> None:
        self._file.close()

    def _chunks(self) -> Iterator[bytes]:
        while True:
            size_text = self._line().split(b";", 1)[0].strip()
            if not 0 < len(size_text) <= 16 or size_text.strip(b"0123456789abcdefABCDEF"):
                raise BadReply(f"bad chunk size {size_text!r}")
            size = int(size_text, 16)
            if size > _BODY_MAX:
                raise BadReply(f"a chunk of {size} bytes")
            if size == 0:
                while self._line() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            while size:  # in pieces: a line's length is checked as it grows (lines())
                piece = self._file.read(min(size, _LINE_MAX))
                if not piece:
                    raise BadReply("a chunk ended early")
                size -= len(piece)
                yield piece
            if self._line() not in (b"\r\n", b"\n"):
                raise BadReply("a chunk ended early")

    def _line(self) -> bytes:
        line = self._file.readline(_LINE_MAX + 1)
        if len(line) > _LINE_MAX:
            raise BadReply("a line of the reply is too long")
        return line


def _digits(text: str) -> bool:
    """``text`` is a non-negative decimal number in ASCII digits (``str.isdigit`` takes ``²``)."""
    return 0 < len(text) <= 18 and text.isascii() and text.isdigit()


def exchange(path: str, method: str, target: str, body: bytes | None = None, *,
             headers: Mapping[str, str] | None = None, timeout: float | None = None
             ) -> tuple[socket.socket, Response]:
    """Send one request to the daemon at ``path``; its connection and reply (the caller closes both).

    :raise OSError: the daemon could not be reached or its reply is not HTTP/1.1 (:class:`BadReply`).
    """
    head = [f"{method} {target} HTTP/1.1", "Host: localhost", "Connection: close"]
    head += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body is not None:
        head.append(f"Content-Length: {len(body)}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + (body or b""))
        return sock, Response(sock)
    except BaseException:
        sock.close()
        raise


def _json(raw: bytes) -> Any:
    """A reply's body decoded, or None when it is empty or not JSON."""
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def error_from(status: int, body: Any) -> BlockcopyError:
    """The CLI's exception for a problem document (its class by name, else one with its exit code);
    a body that is not one (not JSON, or not an object) gives the status alone."""
    if not isinstance(body, Mapping):
        body = {}
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
    def find(cls, socket_path: str) -> DaemonClient | None:
        """The daemon listening on ``socket_path``, or None (no socket, or a dead daemon's)."""
        # (os.path.exists is False for a socket this user may not look at: not this user's daemon,
        # so the command runs here and says what it cannot open.)
        if os.environ.get(NO_DAEMON_ENV) == "1" or not os.path.exists(socket_path):
            return None
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(socket_path)
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK, errno.EACCES):
                return None
            raise BlockcopyError(f"cannot reach the blockcopy daemon at {socket_path}: {exc.strerror}") from None
        finally:
            probe.close()
        return cls(socket_path)

    def call(self, method: str, path: str, body: Any = None, *, headers: Mapping[str, str] | None = None,
             query: Mapping[str, Any] | None = None) -> Any:
        """One request; the decoded JSON reply. :raise BlockcopyError: the daemon's error, as the CLI's."""
        given = {k: _q(v) for k, v in (query or {}).items() if v is not None}
        if given:
            path += "?" + _urlencode(given)
        data = json.dumps(body).encode() if body is not None else None
        sock = None
        try:
            sock, response = exchange(self.path, method, path, data, timeout=self.timeout,
                                      headers={"Content-Type": "application/json", **(headers or {})})
            raw = response.read()
            response.close()
        except OSError as exc:
            raise BlockcopyError(f"the blockcopy daemon at {self.path} did not answer: {exc}; its jobs go on. "
                                 "Run the command again (with --no-daemon if the daemon is stopped)") from None
        finally:
            if sock is not None:
                sock.close()
        decoded = _json(raw)
        if response.status >= 400:
            raise error_from(response.status, decoded)
        if not isinstance(decoded, (dict, list)):
            raise BlockcopyError(f"the blockcopy daemon at {self.path} sent a reply that is not JSON "
                                 f"(HTTP {response.status}); its jobs go on. Run the command again")
        return decoded

    def events(self, after: int, job: str | None = None) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """Server-sent events from ``after`` on: (sequence number, kind, data), until the daemon
        closes the stream (it stops).

        :raise OSError: the stream could not be opened or broke (the daemon was killed, or sent
            what the client cannot read). :raise BlockcopyError: the daemon refused the request.
        """
        query = _urlencode({k: str(v) for k, v in (("after", after), ("job", job)) if v is not None})
        sock, response = exchange(self.path, "GET", f"/v1/events?{query}", headers={"Accept": "text/event-stream"})
        try:
            if response.status >= 400:
                raise error_from(response.status, _json(response.read()))
            try:
                yield from read_events(response.lines())
            except (ValueError, UnicodeDecodeError) as exc:  # an event cut short or garbled
                raise BadReply(f"an event that cannot be read: {exc}") from None
        finally:
            response.close()
            sock.close()


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


def _standing(view: Mapping[str, Any]) -> str:
    """What an interrupted wait leaves: a pivot or finish asked before it stands."""
    goal = view.get("goal")
    return f"; the {goal} asked before it stands (carried out once the copy is ready)" \
        if goal in ("pivot", "finish") and view.get("phase") == "copying" else ""


def _q(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


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

    async def copy(self, fields: Mapping[str, Any], wait_until: str, on_progress: Callable[[Any], None] | None
                   ) -> dict[str, Any]:
        """``fields``: CopyRequest's, with the goal's value and ``--dest-option`` texts (the daemon
        checks them as the embedded backend does). ``wait_until``: "started", "ready" or "done"
        (followed on the event stream)."""
        owner = fields["owner"]
        body: dict[str, Any] = {
            "domain": fields["domain"], "disks": [{"disk": d, "destination": p} for d, p in fields["targets"]],
            "goal": fields["goal"], "format": fields["format"], "shallow": fields["shallow"],
            "reuse_external": fields["reuse_external"], "bandwidth_mib": fields["bandwidth_mib"],
            "buf_size": fields["buf_size"], "mode": fields["mode"], "dest_options": list(fields["dest_options"]),
            "owner": {"uid": owner[0], "gid": owner[1]} if owner else None, "file_mode": fields["mode_bits"],
            "cluster_size": fields["cluster_size"], "preallocation": fields["preallocation"],
            "request_id": fields["client_key"]}
        if fields.get("page_cache_fill"):  # only when asked: a daemon older than the option refuses the field
            body["page_cache_fill"] = True
        token = os.urandom(8).hex()  # (names the goal this request journals: see _interruptible)
        asks = fields["goal"] in ("pivot", "finish")
        view = dict(self.client.call("POST", "/v1/jobs", {k: v for k, v in body.items() if v is not None},
                                     query={"asked_by": token if asks else None}))
        if wait_until == "started" or view["outcome"] is not None:
            return view
        with self._interruptible(view["id"], token):
            # The request goes first (it starts QEMU's work); then where the event stream stands, then
            # the job as of then: what it did before is in the view, what it does after is on the stream.
            after = int(self.client.call("GET", "/v1/health")["last_event"])
            view = dict(self.client.call("GET", f"/v1/jobs/{_seg(view['id'])}"))
            return self._follow(view, after, wait_until, on_progress)

    @contextlib.contextmanager
    def _interruptible(self, job: str, token: str) -> Iterator[None]:
        """Ctrl-C while waiting: as without the daemon, the wait's pivot or finish is withdrawn (one
        under way runs to its end) and the job keeps copying; exit 130. Only the goal that this
        command's request (``token``) journaled: one journaled before it (by an app, another
        command, the same request sent before) stays, and one it replaced is put back."""
        try:
            yield
        except KeyboardInterrupt:
            view = self.client.call("POST", f"/v1/jobs/{_seg(job)}/keep-copying", query={"asked_by": token})
            raise Interrupted(f"stopped waiting; job {job} keeps running in QEMU{_standing(view)}") from None

    def _follow(self, view: dict[str, Any], after: int, wait_until: str,
                on_progress: Callable[[Any], None] | None) -> dict[str, Any]:
        """Follow the job's events until it is ready (``wait_until`` "ready") or has ended."""
        job = view["id"]
        if self._reached(view, wait_until):
            return view
        progress = ProgressFromEvents(job, view)
        try:
            for _seq, kind, data in self.client.events(after, job):
                record = progress.feed(kind, data)
                if record is not None and on_progress is not None:
                    on_progress(record)
                if kind in ("ready", "outcome", "state"):
                    view = dict(self.client.call("GET", f"/v1/jobs/{_seg(job)}"))
                    if self._reached(view, wait_until):
                        return view
        except OSError as exc:
            raise BlockcopyError(f"the blockcopy daemon's event stream broke ({exc}) while job {job} was followed; "
                                 f"the job goes on. `blockcopy status {job}` shows it") from None
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
        if goal == "abort":
            return dict(self.client.call("POST", f"/v1/jobs/{_seg(job)}/abort"))
        token = os.urandom(8).hex()
        with self._interruptible(job, token):
            return dict(self.client.call("POST", f"/v1/jobs/{_seg(job)}/{goal}",
                                         query={"wait": True if wait else None, "asked_by": token}))

    async def recover(self, domain: str | None, wait: bool, on_progress: Callable[[Any], None] | None
                      ) -> list[dict[str, Any]]:
        return list(self.client.call("POST", "/v1/recover", query={"domain": domain, "wait": wait or None}))

    async def speed(self, job: str, bandwidth_mib: float) -> dict[str, Any]:
        return dict(self.client.call("POST", f"/v1/jobs/{_seg(job)}/speed", {"bandwidth_mib": bandwidth_mib}))

    def close(self) -> None:
        pass


def _seg(text: str) -> str:
    """``text`` as one path segment (RFC 3986 unreserved characters kept, every other byte escaped),
    as ``urllib.parse.quote(text, safe="")`` writes it; urllib.parse is not loaded for this."""
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in text.encode())


def _urlencode(query: Mapping[str, str]) -> str:
    return "&".join(f"{_seg(k)}={_seg(v)}" for k, v in query.items())


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


class ProgressFromEvents:
    """What the progress bar reads of a job's record (``ui.progress_label``), kept from the job's
    events as they come: each event changes only what it is about (a `progress` event after
    `ready` leaves the job ready, one after `waiting` leaves it waiting)."""

    def __init__(self, job: str, view: Mapping[str, Any]) -> None:
        self.job = job
        progress = view.get("progress") or {}
        self.current, self.total = progress.get("current", 0), progress.get("total", 0)
        self.ready = view.get("ready_at") is not None
        self.waiting = view.get("waiting") or ""  # (a daemon older than the field does not send it)
        self.copying = view.get("phase") in (None, "starting", "copying")

    def feed(self, kind: str, data: Mapping[str, Any]) -> Any:
        """The record after event ``kind``, or None when the event changes nothing the bar shows."""
        if kind == "state":
            self.copying = data.get("phase") in ("starting", "copying")
            if not self.copying:
                self.waiting = ""  # (past the copy nothing holds it; no bar update: the job goes on past it)
            return None
        if not self.copying:
            return None  # (what follows a move past the copy, e.g. the `waiting` "" of an abort, is not the bar's)
        if kind == "progress":
            self.current, self.total = data["current"], data["total"]
        elif kind == "ready":
            self.ready = True
        elif kind == "waiting":
            self.waiting = data["reason"]
        else:
            return None
        disk = SimpleNamespace(progress_current=self.current, progress_total=self.total)
        return SimpleNamespace(id=self.job, disks=[disk], ready_at=1.0 if self.ready else None,
                               waiting=self.waiting)
