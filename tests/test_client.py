"""The CLI's own HTTP/1.1 reader (``blockcopy.service.client.Response``), on replies a server could
send: framing by length, by chunks (extensions, trailers) and by the end of the connection, and the
malformed ones, which must be a clear OSError (the CLI's "did not answer") rather than a wrong body.
Pure parsing over a socketpair; the same client against the real daemon is in test_service.py."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable

import pytest

from blockcopy.cli import FAILED, _last_per_key, _to_the_end, main
from blockcopy.errors import BlockcopyError
from blockcopy.protocol import MIGRATION_WAIT
from blockcopy.records import Outcome
from blockcopy.service.client import (
    BadReply,
    DaemonClient,
    ProgressFromEvents,
    RemoteBackend,
    Response,
    _seg,
    _urlencode,
    read_events,
)
from blockcopy.ui import progress_label


def reply(raw: bytes) -> Response:
    """The reply a server sends as ``raw`` and then closes (the socket lives as long as the reply's file)."""
    ours, theirs = socket.socketpair()
    theirs.sendall(raw)
    theirs.close()
    return Response(ours)


def test_a_body_with_a_content_length_is_read_to_its_length_only() -> None:
    r = reply(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}extra")
    assert (r.status, r.headers["content-type"], r.read()) == (201, "application/json", b'{"a":1}')


def test_chunks_with_extensions_and_trailers_are_joined() -> None:
    r = reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n"
              b"4;ext=1\r\nabcd\r\n3\r\nefg\r\n0\r\nX-Trailer: t\r\n\r\n")
    assert r.read() == b"abcdefg"


def test_without_a_length_the_body_ends_with_the_connection() -> None:
    assert reply(b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nall of it").read() == b"all of it"


def test_an_event_stream_split_across_chunks_gives_whole_lines_and_events() -> None:
    stream = (b'id: 7\nevent: ready\ndata: {"job": "j1"}\n\n: keepalive\n\n'
              b'id: 8\nevent: outcome\ndata: {"job": "j1"}\n\n')
    pieces = [stream[i:i + 5] for i in range(0, len(stream), 5)]
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    r = reply(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + body)
    assert list(read_events(r.lines())) == [(7, "ready", {"job": "j1"}), (8, "outcome", {"job": "j1"})]


@pytest.mark.parametrize("raw", [
    b"",  # the daemon closed without a word
    b"SSH-2.0-OpenSSH\r\n\r\n",  # not HTTP
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n",  # a header line past the limit
    b"HTTP/1.1 200 OK\r\n",  # the head ends with the connection
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",  # never asked for
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded: 2\r\n\r\n",  # obsolete line folding
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
])
def test_a_reply_that_is_not_http_is_a_bad_reply(raw: bytes) -> None:
    with pytest.raises(BadReply):
        reply(raw)


def test_an_event_line_that_never_ends_is_a_bad_reply_not_a_growing_buffer() -> None:
    r = reply(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\ndata: " + b"x" * 70_000)
    with pytest.raises(BadReply, match="too long"):
        list(r.lines())


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nab",  # a digit to str.isdigit, not to HTTP
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nab\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 40 + b"\r\nab\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc",
])
def test_a_body_cut_short_or_badly_framed_is_a_bad_reply_not_a_wrong_body(raw: bytes) -> None:
    with pytest.raises(BadReply):
        reply(raw).read()


def test_a_bad_reply_from_the_daemon_is_the_clis_clear_error(tmp_path: object) -> None:
    """A peer that answers garbage: the CLI says the daemon did not answer (exit 1), nothing else."""
    path = f"{tmp_path}/api.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n{}")
        conn.close()

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        with pytest.raises(BlockcopyError, match=r"did not answer.*ended after 2 of 99 bytes") as caught:
            DaemonClient(path, timeout=10).call("GET", "/v1/jobs")
        assert type(caught.value) is BlockcopyError and caught.value.exit_code == 1
    finally:
        thread.join(timeout=10)
        server.close()


def test_path_segments_and_queries_are_escaped_as_urllib_does() -> None:
    import urllib.parse

    for text in ("job-1", "a b/c?d#e%f", "é_~.-", "&="):
        assert _seg(text) == urllib.parse.quote(text, safe="")
    query = {"domain": "vm 1&x", "wait": "true"}
    assert urllib.parse.parse_qs(_urlencode(query)) == {k: [v] for k, v in query.items()}


class FakeDaemon:
    """A unix-socket server that answers each request with the reply its handler gives for the
    request line (pure logic: what the CLI's client does with the replies, not the daemon)."""

    def __init__(self, path: str, handler: Callable[[str], bytes]) -> None:
        self.requests: list[str] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(8)
        self._handler = handler
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head and (data := conn.recv(65536)):
                    head += data
                line = head.split(b"\r\n", 1)[0].decode()
                self.requests.append(line)
                conn.sendall(self._handler(line))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # (ends the accept() its thread waits in)
        self._server.close()
        self._thread.join(timeout=10)


def _json(body: object, status: str = "200 OK") -> bytes:
    data = json.dumps(body).encode()
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (status.encode(), len(data), data)


@pytest.mark.parametrize("stream", [
    b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1a\r\nid: 3\nevent: progress\ndata: {"cu',  # cut mid-chunk
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",  # cut before the first chunk
    b"",  # the daemon went away between the job's request and the stream's
])
def test_a_stream_cut_while_a_copy_is_followed_ends_the_wait_with_the_clis_message(tmp_path: object,
                                                                                  stream: bytes) -> None:
    """The daemon killed while `copy --wait` follows the job: the CLI says so (the job goes on, how
    to see it), as a BlockcopyError; no traceback, no hang."""
    view = {"id": "j1", "outcome": None, "ready_at": None}

    def handler(line: str) -> bytes:
        if line.startswith("POST /v1/jobs "):
            return _json(view, "201 Created")
        if line.startswith("GET /v1/health"):
            return _json({"last_event": 2})
        if line.startswith("GET /v1/jobs/j1 "):
            return _json(view)
        return stream

    fake = FakeDaemon(f"{tmp_path}/api.sock", handler)
    try:
        backend = RemoteBackend(DaemonClient(f"{tmp_path}/api.sock", timeout=10))
        fields = {"domain": "vm", "targets": [("vda", "/d.qcow2")], "goal": "copy", "format": None, "shallow": False,
                  "reuse_external": False, "bandwidth_mib": None, "buf_size": None, "mode": "write-blocking",
                  "dest_options": [], "owner": None, "mode_bits": None, "cluster_size": None, "preallocation": None,
                  "client_key": None}
        with pytest.raises(BlockcopyError, match=r"blockcopy daemon.* while job j1 was followed; the job goes on"):
            _to_the_end(backend.copy(fields, "ready", None))
        assert fake.requests == ["POST /v1/jobs HTTP/1.1", "GET /v1/health HTTP/1.1", "GET /v1/jobs/j1 HTTP/1.1",
                                 "GET /v1/events?after=2&job=j1 HTTP/1.1"]
    finally:
        fake.close()


def test_the_clis_failed_outcome_is_the_records() -> None:
    assert Outcome.FAILED.value == FAILED  # (the CLI does not load records through the daemon)


def test_repeated_dest_options_are_sent_once_and_every_distinct_text_is_still_checked() -> None:
    assert _last_per_key(["x=1"] * 40) == ["x=1"]  # (the daemon takes at most 32)
    # A key's last value wins, as in the options' dict; a bad text before a good one is still sent
    # (and refused), not dropped.
    assert _last_per_key(["x=1", "y=1", "x=2", "x=1"]) == ["y=1", "x=2", "x=1"]
    assert _last_per_key(["cache.direct=maybe", "cache.direct=on"]) == ["cache.direct=maybe", "cache.direct=on"]


@pytest.mark.parametrize("reply_bytes", [
    b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /v1/jobs\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnull",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n42",
])
def test_a_success_that_is_not_a_json_document_is_an_error(tmp_path: object, reply_bytes: bytes) -> None:
    fake = FakeDaemon(f"{tmp_path}/api.sock", lambda line: reply_bytes)
    try:
        with pytest.raises(BlockcopyError, match="not JSON"):
            DaemonClient(f"{tmp_path}/api.sock", timeout=10).call("GET", "/v1/jobs")
    finally:
        fake.close()


def test_an_error_reply_that_is_not_json_on_the_event_stream_is_the_daemons_error(tmp_path: object) -> None:
    """uvicorn's own 500 is chunked text: the CLI's error, not a traceback."""
    text = b"Internal Server Error"
    answer = b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        len(text), text)
    fake = FakeDaemon(f"{tmp_path}/api.sock", lambda line: answer)
    try:
        with pytest.raises(BlockcopyError, match="HTTP 500"):
            list(DaemonClient(f"{tmp_path}/api.sock", timeout=10).events(0, "j1"))
    finally:
        fake.close()


def test_a_huge_chunk_is_a_bad_reply_and_a_chunked_line_is_capped_as_it_grows() -> None:
    with pytest.raises(BadReply, match="chunk of"):
        reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab").read()
    body = b"x" * 70_000
    r = reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    with pytest.raises(BadReply, match="too long"):
        list(r.lines())
    with pytest.raises(BadReply, match="Content-Length"):
        reply(b"HTTP/1.1 200 OK\r\nContent-Length: 999999999999999999\r\n\r\n").read()


@pytest.mark.parametrize("argv", [["status", ""], ["detach", ""], ["pivot", ""], ["disks", ""]])
def test_an_empty_job_or_domain_name_is_refused_before_anything_is_asked(tmp_path: object, argv: list[str],
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """(Through the daemon an empty path segment would name another resource: the API redirects it.)"""
    assert main([*argv, "--state-dir", f"{tmp_path}/state"]) == 2
    assert "give a" in capsys.readouterr().err


def test_the_daemons_progress_bar_keeps_what_each_event_does_not_change() -> None:
    """The CLI's bar through the daemon is made from the job's events: a `progress` event after
    `ready` or `waiting` changes the bytes only (it used to show `copying` again), and the wait is
    said until its end, which a move past copying also means (after which the bar shows nothing new)."""
    view = {"progress": {"current": 0, "total": 100}, "ready_at": None}  # (a daemon without `waiting`)
    bar = ProgressFromEvents("j", view)
    seen = []
    for kind, data in (("progress", {"current": 50, "total": 100}), ("ready", {}),
                       ("progress", {"current": 100, "total": 101}), ("waiting", {"reason": "a dump"}),
                       ("progress", {"current": 101, "total": 101}), ("speed", {}), ("waiting", {"reason": ""}),
                       ("waiting", {"reason": "a dump"}), ("state", {"phase": "aborting"}),
                       ("waiting", {"reason": ""}), ("progress", {"current": 101, "total": 101})):
        record = bar.feed(kind, data)
        if record is not None:
            seen.append((progress_label(record), sum(d.progress_current for d in record.disks)))
    dump = "ready, waiting for a memory dump to end"
    assert seen == [("copying", 50), ("ready", 50), ("ready", 100), (dump, 100), (dump, 101), ("ready", 101),
                    (dump, 101)]  # (an abort's own `waiting` "" is not the bar's)
    migrating = ProgressFromEvents("j", view).feed("waiting", {"reason": MIGRATION_WAIT})
    assert migrating is not None and progress_label(migrating) == "ready, waiting for a migration to end"
