"""Listening: the unix socket (peers named by the kernel), an optional TLS TCP listener (bearer
token), systemd readiness, and a clean stop on SIGTERM.

uvicorn serves the application: a maintained ASGI server that takes pre-bound sockets, so blockcopy
binds them itself (mode, group, a stale socket of a killed daemon) and checks each unix peer with
SO_PEERCRED as the connection is made, before a byte of HTTP is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import stat
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from blockcopy.errors import BlockcopyError, UsageError
from blockcopy.service.api import create_app, problem_document
from blockcopy.service.client import default_socket
from blockcopy.service.daemon import Daemon
from blockcopy.service.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class Access:
    """Who may use the unix socket: root, the daemon's own user, and these users and groups."""

    uids: set[int] = field(default_factory=set)
    gids: set[int] = field(default_factory=set)

    def allows(self, uid: int, gid: int, groups: set[int]) -> bool:
        return uid in (0, os.geteuid()) or uid in self.uids or gid in self.gids or bool(self.gids & groups)


#: SO_PEERGROUPS (Linux 4.13): the peer's groups as the kernel saw them at connect(), unlike
#: /proc/PID/status, which a peer could swap by exiting and letting another process take its pid.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: A connection must have sent a whole request head this long after it opened (or after its
#: previous response): a client that trickles bytes cannot hold a connection, and so a file
#: descriptor, for longer.
HEAD_TIMEOUT = 10.0
#: Connections per listener; beyond, new ones are closed at once (the daemon's descriptors are
#: for QMP, images and the journal first).
MAX_CONNECTIONS = 256


def _peer_groups(sock: socket.socket, pid: int) -> set[int]:
    """The peer's supplementary groups. Python reads at most 1024 bytes of a socket option (256
    groups); a peer with more is read from /proc (as of now, not of its connect)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
    except OSError:
        return _proc_groups(pid)
    return set(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))


def _proc_groups(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


def _protocol(access: Access | None) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol with a deadline for each request head, a connection cap, and,
    for the unix socket (``access``), the peer's credentials checked before a byte is read."""

    class Guarded(H11Protocol):
        refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > MAX_CONNECTIONS:
                log.warning("refused a connection: %d open already", MAX_CONNECTIONS)
                transport.abort()
                return
            self._arm_head_deadline()
            sock = transport.get_extra_info("socket")
            if access is None or sock is None or sock.family != socket.AF_UNIX:
                return
            pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                struct.calcsize("3i")))
            if not access.allows(uid, gid, _peer_groups(sock, pid)):
                log.warning("refused a connection from uid %d gid %d (pid %d): not allowed", uid, gid, pid)
                body = json.dumps(problem_document(
                    403, "Forbidden", f"uid {uid} may not use this blockcopy daemon; ask its administrator for "
                    "--allow-user or --allow-group")).encode()
                transport.write(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/problem+json\r\n"
                                b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                # Half-close and discard what the peer sends: closing with its request unread would
                # reset the connection before it reads the 403.
                self.refused = True
                if transport.can_write_eof():
                    transport.write_eof()
                asyncio.get_running_loop().call_later(5.0, transport.close)

        def _arm_head_deadline(self) -> None:
            self._head_deadline = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, self._head_overdue)

        def _head_overdue(self) -> None:
            if self.cycle is None or self.cycle.response_complete:  # (no request being answered)
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._head_deadline.cancel()
            self._head_deadline = asyncio.get_running_loop().call_later(
                HEAD_TIMEOUT + self.config.timeout_keep_alive, self._head_overdue)

        def connection_lost(self, exc: Exception | None) -> None:
            deadline = getattr(self, "_head_deadline", None)
            if deadline is not None:
                deadline.cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self.refused:
                super().data_received(data)

    return Guarded


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the daemon stops its servers itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_unix(path: Path, group: int | None) -> socket.socket:
    """Bind the API socket with mode 0660 (group ``group``). A socket left by a daemon that was
    killed is replaced; a live daemon's, or any other file, is refused.

    :raise UsageError: the path is taken.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise UsageError(f"{path} exists and is not a socket; remove it or choose another --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno != errno.ECONNREFUSED:
                raise UsageError(f"cannot tell whether {path} is in use: {exc}") from None
            os.unlink(path)  # a killed daemon's
        else:
            raise UsageError(f"another blockcopy daemon listens on {path}; stop it first (or choose --socket)")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    umask = os.umask(0o117)
    try:
        sock.bind(str(path))
    finally:
        os.umask(umask)
    if group is not None:
        os.chown(path, -1, group)
    sock.listen(128)
    return sock


def _open_to_group(state_dir: Path, run_dir: Path, group: int) -> None:
    """Let ``group`` reach the default socket: the state directory traversable (0711; its journal
    and locks stay the owner's), its run directory the group's (0750)."""
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    os.chown(run_dir, -1, group)
    os.chmod(run_dir, 0o750)
    os.chmod(state_dir, stat.S_IMODE(os.stat(state_dir).st_mode) | 0o711)


def parse_listen(address: str) -> tuple[str, int]:
    """``--listen HOST:PORT`` (``HOST`` empty: 127.0.0.1; IPv6 in brackets).

    :raise UsageError: not HOST:PORT, or a port out of range."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen takes HOST:PORT with a port from 1 to 65535, not {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def bind_tcp(address: str) -> socket.socket:
    host, port = parse_listen(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock


def sd_notify(message: str) -> None:
    """Tell systemd (``Type=notify``) ``message``, when it started the daemon."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    if target.startswith("@"):
        target = "\0" + target[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock, \
            contextlib.suppress(OSError):
        sock.connect(target)
        sock.sendall(message.encode())


@dataclass
class ServeOptions:
    state_dir: str | None = None
    socket_path: str | None = None
    access: Access = field(default_factory=Access)
    socket_group: int | None = None
    listen: str | None = None  # HOST:PORT of the TLS listener
    tls_cert: str | None = None
    tls_key: str | None = None
    token_file: str | None = None
    daemon_options: dict[str, float] = field(default_factory=dict)


def _token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read the token file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise UsageError(f"the token in {path} is too short: use at least 16 characters (e.g. `openssl rand -hex 32`)")
    return token


def _config(app: Any, access: Access | None, **ssl: Any) -> uvicorn.Config:
    return uvicorn.Config(app, http=_protocol(access), lifespan="off", access_log=False, log_level="warning",
                          timeout_keep_alive=30, timeout_graceful_shutdown=3, **ssl)


async def serve(options: ServeOptions) -> int:
    """Run the daemon until SIGTERM or SIGINT. :raise BlockcopyError: it could not start."""
    if options.listen and not (options.tls_cert and options.tls_key and options.token_file):
        raise UsageError("--listen needs --tls-cert, --tls-key and --token-file: the TCP listener is TLS with a "
                         "bearer token only")
    if options.listen:
        parse_listen(options.listen)  # (before any file is read)
    token = _token(options.token_file) if options.listen and options.token_file else None
    # From here on SIGTERM stops the daemon in order: recovery under way (a pivot) is finished first.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    daemon = Daemon(options.state_dir, **options.daemon_options)
    sockets: list[socket.socket] = []
    path = Path(options.socket_path or default_socket(daemon.state_dir))
    bound: os.stat_result | None = None
    try:
        if options.socket_group is not None and not options.socket_path:
            _open_to_group(daemon.state_dir, path.parent, options.socket_group)
        sockets.append(bind_unix(path, options.socket_group))
        bound = os.lstat(path)
        if options.listen:
            sockets.append(bind_tcp(options.listen))
        await daemon.start()
        metrics = Metrics(daemon)
        servers = [_Server(_config(create_app(daemon, metrics=metrics), options.access))]
        if options.listen:
            servers.append(_Server(_config(create_app(daemon, token=token, metrics=metrics), None,
                                           ssl_certfile=options.tls_cert, ssl_keyfile=options.tls_key)))
        running = [asyncio.create_task(server.serve(sockets=[sock])) for server, sock in zip(servers, sockets,
                                                                                                 strict=True)]
        while not all(server.started for server in servers):
            failed = next((task for task in running if task.done()), None)
            if failed is not None:
                for server in servers:
                    server.should_exit = True
                await asyncio.gather(*running, return_exceptions=True)
                cause = failed.exception() if not failed.cancelled() else None
                raise UsageError(f"a listener did not start: {cause!r}")
            await asyncio.sleep(0.01)
        log.warning("blockcopy daemon ready on %s%s", path, f" and {options.listen} (TLS)" if options.listen else "")
        sd_notify("READY=1\nSTATUS=serving")
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([waiter, *running], return_when=asyncio.FIRST_COMPLETED)
        sd_notify("STOPPING=1")
        for server in servers:
            server.should_exit = True
        await daemon.close_streams()
        await asyncio.gather(*running, return_exceptions=True)
        waiter.cancel()
        return 0
    finally:
        await daemon.close()
        for sock in sockets:
            sock.close()
        with contextlib.suppress(OSError):
            now = os.lstat(path)
            if bound is not None and (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
                os.unlink(path)  # ours, not a socket another daemon bound since


def run(options: ServeOptions, *, log_level: int = logging.WARNING) -> int:
    logging.basicConfig(level=log_level, format="blockcopy: %(name)s: %(message)s")
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    try:
        return asyncio.run(serve(options))
    except BlockcopyError as exc:
        print(f"blockcopy: error: {exc}", flush=True, file=__import__("sys").stderr)
        return exc.exit_code


def parse_ids(values: Sequence[str], *, groups: bool) -> set[int]:
    import grp
    import pwd

    out = set()
    for value in values:
        if value.isdigit():
            out.add(int(value))
            continue
        try:
            out.add(grp.getgrnam(value).gr_gid if groups else pwd.getpwnam(value).pw_uid)
        except KeyError:
            raise UsageError(f"unknown {'group' if groups else 'user'} {value!r}") from None
    return out
