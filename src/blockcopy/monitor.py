"""A thin QMP layer over ``qemu.qmp``: connect, run commands, observe, wait for events.

It turns the library's exceptions into blockcopy's (:class:`NoListener`, :class:`ConnectionLost`,
:class:`MonitorTimeout`, :class:`MonitorBusy`, :class:`CommandRefused`) and QEMU's answers into the
pure :class:`~blockcopy.protocol.Observation` that the state machine reads. It decides nothing;
in particular it never concludes that QEMU is gone (a missing socket or a dropped connection does
not prove that): it names the process it talks to (:attr:`Monitor.process`) and lets the caller
ask whether that process still exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import itertools
import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, Message, QMPClient, StateError
from qemu.qmp.protocol import ConnectError, Runstate

from blockcopy.defaults import COMMAND_TIMEOUT
from blockcopy.errors import ConnectionLost, MonitorBusy, MonitorError, MonitorTimeout, NoListener
from blockcopy.nodes import FILTER_DRIVERS, image_below
from blockcopy.protocol import JobView, Observation
from blockcopy.qemuproc import QemuProcess, peer_process

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The ``opaque`` of the fd sets blockcopy passes DEST in, followed by DEST's path.
FDSET_OPAQUE_PREFIX = "blockcopy "

#: Events that move the protocol forward; anything else is ignored.
WATCHED_EVENTS = ("JOB_STATUS_CHANGE", "BLOCK_JOB_READY", "BLOCK_JOB_ERROR", "BLOCK_JOB_COMPLETED",
                  "BLOCK_JOB_CANCELLED", "STOP", "RESUME", "SHUTDOWN")


class CommandRefused(MonitorError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        super().__init__(f"QEMU refused {command}: {description}")
        self.command = command
        self.error_class = error_class
        self.description = description


#: Called each time a message sent from the current context (a task and the tasks it starts) has
#: been put in the library's outgoing queue, which it writes to QEMU in order: a caller counts its
#: own messages this way, whoever else shares the connection (the daemon's other jobs and requests).
ON_QUEUED: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("on_queued", default=None)


class LeanQMPClient(QMPClient):
    """``QMPClient`` tuned for the milliseconds while a guest is paused for a pivot.

    - QEMU 7.2 reads QMP input one byte per main-loop iteration, about 4 us per byte here
      (`bench/run.py qmp`), so every byte of a command counts: execution ids are short counters
      instead of the library's ``__qmp#00042``.
    - The library's message hooks call ``str(msg)`` (a fresh JSON encoding) for a ``logger.debug``
      that is normally off, about 0.1 ms per message; here the logger formats only when it prints.
      These hooks are the library's documented extension points.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._short_ids = itertools.count(1)

    def _get_exec_id(self) -> str:
        return f"{next(self._short_ids):x}"  # unique per connection, as the protocol asks

    async def _issue(self, msg: Message) -> str | None:
        msg_id = await super()._issue(msg)
        queued = ON_QUEUED.get()
        if queued is not None:
            queued()
        return msg_id

    def _cb_outbound(self, msg: Message) -> Message:
        self.logger.debug("--> %s", msg)
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        self.logger.debug("<-- %s", msg)
        return msg


class _CountingListener(EventListener):
    """Hands each watched event to ``on_event`` as it arrives: no queue for one reader to empty and
    no unbounded ``history`` list (a manager runs for days)."""

    def __init__(self, names: Iterable[str], on_event: Callable[[Mapping[str, Any]], None]) -> None:
        super().__init__(list(names))
        self._on_event = on_event

    async def put(self, event: Message) -> None:
        if self.accept(event):
            try:
                self._on_event(event)
            except (TypeError, ValueError, KeyError) as exc:  # never the library's reader task's end
                log.warning("QMP event not understood (%s): %.200s", exc, event)


@dataclass(frozen=True)
class DeviceInfo:
    """One disk as ``query-block`` shows it."""

    name: str  # qdev id when the device has one, else the drive id
    qdev_id: str | None
    drive_id: str | None
    device_key: str
    node: str
    file: str
    format: str
    virtual_size: int
    backing_chain: tuple[str, ...]  # backing files, nearest first
    backing_format: str | None
    read_only: bool


def event_time(event: Mapping[str, Any]) -> float:
    stamp = event.get("timestamp", {})
    return float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6


class Monitor:
    """One exclusive QMP connection to one QEMU process."""

    #: called with (command, seconds) after every command, answered or not (the daemon's metrics)
    round_trip_observer: Callable[[str, float], None] | None = None

    def __init__(self, socket_path: str, client: QMPClient, process: QemuProcess | None, *,
                 command_timeout: float = COMMAND_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.process = process  # who answered: SO_PEERCRED of this connection
        self.command_timeout = command_timeout
        self._client = client
        self._listener = _CountingListener(WATCHED_EVENTS, self._note)
        client.register_listener(self._listener)
        # Done at the next watched event; every task waiting for one awaits it (the daemon's jobs
        # of a domain share this connection, and each must wake on each event).
        self._arrived: asyncio.Future[None] | None = None
        # The built-in listener keeps every event forever; blockcopy does not read it.
        client.events.event_filter = lambda _event: False
        self.last_events: dict[str, tuple[int, float]] = {}  # name -> (event number, QEMU's time)
        self.event_seq = 0  # how many watched events have arrived; lets waits skip what was seen
        # A descriptor passed with SCM_RIGHTS waits in QEMU for the next add-fd, and a second one
        # replaces it: one pass at a time per connection (the daemon shares one among jobs).
        self._passing_fd = asyncio.Lock()

    @classmethod
    async def connect(cls, socket_path: str, *, timeout: float = 5.0,
                      command_timeout: float = COMMAND_TIMEOUT) -> Monitor:
        """Connect and negotiate. The socket is connected here, not by the library, so that the
        kernel can say which process listens on it (SO_PEERCRED) for this very connection.

        :raise NoListener: the socket file is missing or refuses connections.
        :raise MonitorBusy: connected, but QEMU sent no greeting (it serves another client).
        :raise MonitorError: any other connection failure.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, socket_path), timeout)
        except (OSError, TimeoutError) as exc:
            sock.close()
            if isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
                raise NoListener(f"nothing listens on the QMP socket {socket_path} ({exc.strerror}): "
                                 "is the VM running?") from None
            raise MonitorError(f"cannot connect to the QMP socket {socket_path}: {exc or 'timed out'}") from None
        process = peer_process(sock)
        client = LeanQMPClient("blockcopy")
        try:
            await asyncio.wait_for(client.connect(sock), timeout)
        except TimeoutError:
            await _quiet_disconnect(client)
            sock.close()
            raise MonitorBusy(
                f"the QMP socket {socket_path} accepted the connection but QEMU sent no greeting within "
                f"{timeout:g} s: another client (libvirt, a qmp-shell, another tool) is connected to it, "
                "or QEMU is stopped or hung. QEMU serves one client per QMP socket; give blockcopy its own "
                "with -qmp unix:PATH,server=on,wait=off") from None
        except ConnectError as exc:
            await _quiet_disconnect(client)
            sock.close()
            raise MonitorError(f"cannot connect to the QMP socket {socket_path}: {exc.exc}") from None
        return cls(socket_path, client, process, command_timeout=command_timeout)

    async def close(self) -> None:
        await _quiet_disconnect(self._client)
        self._wake_waiters()  # a task waiting for an event looks again: no more will come

    @property
    def connected(self) -> bool:
        return self._client.runstate is Runstate.RUNNING

    async def execute(self, command: str, args: Mapping[str, Any] | None = None) -> Any:
        """Run one command.

        :raise CommandRefused: QEMU answered with an error.
        :raise MonitorTimeout: no answer within ``command_timeout``; the connection is dropped, as
            the conversation is out of step (QEMU may still answer the command later).
        :raise ConnectionLost: the connection closed (QEMU exited, or only the connection did).
        """
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(self._client.execute(command, args), self.command_timeout)
        except TimeoutError:
            await self.close()
            raise MonitorTimeout(f"QEMU did not answer {command} within {self.command_timeout:g} s (hung, "
                                 "stopped or overloaded)") from None
        except ExecuteError as exc:
            raise CommandRefused(command, exc.error_class, str(exc)) from None
        except (ExecInterruptedError, StateError, ConnectionError, EOFError) as exc:
            raise ConnectionLost(f"the QMP connection closed during {command}: {exc}") from None
        finally:
            if Monitor.round_trip_observer is not None:
                Monitor.round_trip_observer(command, time.perf_counter() - started)
        return result

    async def add_fd(self, fd: int, opaque: str, fdset_id: int | None = None) -> int:
        """Pass ``fd`` to QEMU (SCM_RIGHTS) into an fd set; returns the set's id. QEMU then opens
        ``/dev/fdset/ID`` by duplicating a descriptor of the set: the very file blockcopy opened and
        checked, whatever the path names by then."""
        args: dict[str, Any] = {"opaque": opaque}
        if fdset_id is not None:
            args["fdset-id"] = fdset_id
        async with self._passing_fd:
            self._client.send_fd_scm(fd)
            return int((await self.execute("add-fd", args))["fdset-id"])

    async def fdsets(self) -> dict[int, str]:
        """blockcopy's fd sets (opaque ``blockcopy PATH``): fdset id -> PATH."""
        found: dict[int, str] = {}
        for fdset in await self.execute("query-fdsets"):
            for fd in fdset.get("fds", []):
                opaque = str(fd.get("opaque") or "")
                if opaque.startswith(FDSET_OPAQUE_PREFIX):
                    found[int(fdset["fdset-id"])] = opaque.removeprefix(FDSET_OPAQUE_PREFIX)
        return found

    def event_time_since(self, name: str, since: int) -> float | None:
        """QEMU's time of the latest ``name`` event that arrived after event number ``since``."""
        seq, at = self.last_events.get(name, (0, 0.0))
        return at if seq > since else None

    async def hmp(self, command_line: str) -> str:
        """Human monitor command; for tests and the demo (guest-like writes via qemu-io)."""
        result = await self.execute("human-monitor-command", {"command-line": command_line})
        return str(result)

    def _note(self, event: Mapping[str, Any]) -> None:
        """Count a watched event as it arrives, and wake every task waiting for one."""
        self.event_seq += 1
        self.last_events[str(event["event"])] = (self.event_seq, event_time(event))
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        arrived, self._arrived = self._arrived, None
        if arrived is not None and not arrived.done():
            arrived.set_result(None)

    async def wait_event(self, timeout: float, since: int) -> None:
        """Return once a watched event arrived after event number ``since``, or after ``timeout`` s.
        Events are counted as they arrive, so any number of tasks may wait at once, each for its
        own ``since``: one task's wait or query never takes another's event."""
        if self.event_seq > since or not self.connected:
            return
        if self._arrived is None:
            self._arrived = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._arrived), timeout)

    # --- queries ---------------------------------------------------------------------------------

    async def run_state(self) -> str:
        status = await self.execute("query-status")
        return str(status["status"])

    async def dump_running(self) -> bool:
        """Whether a dump of the guest's memory runs (``dump-guest-memory`` with ``detach``):
        QEMU refuses ``stop`` and ``cont`` meanwhile. A QEMU (or a QMP proxy) that refuses the
        query is taken for one with no dump running: only a refused ``stop`` would then show it."""
        try:
            return str((await self.execute("query-dump")).get("status")) == "active"
        except CommandRefused:
            return False

    async def complete_taken(self, replaced_node: str) -> bool:
        """Whether QEMU has taken a ``job-complete`` of the mirror that replaces ``replaced_node``
        (a mirror with ``replaces``: filters above the image), while the job may still be `ready`
        copying what is left. QEMU 7.2 aborts on a second one (``mirror_complete`` sets its replace
        blocker again, and the error API asserts it is unset), so a complete that may have gone out
        before (a crash, another process) is asked about first.

        No query reports it; the blocker does: ``mirror_complete`` blocks every operation on the
        node it replaces, with the reason "block device is in use by block-job-complete".
        ``blockdev-snapshot`` checks a node's blockers before it does anything that stays, and is
        refused either way: its overlay names a node that cannot exist (a space is not allowed in
        QEMU's names). On its way it drains every disk (a transaction) and, when the node is not
        blocked, flushes it: ask with the guest paused, where that is short.

        :raise MonitorTimeout, ConnectionLost: as :meth:`execute`."""
        try:
            await self.execute("blockdev-snapshot", {"node": replaced_node, "overlay": "no such node"})
        except CommandRefused as exc:
            return "block-job-complete" in exc.description
        raise MonitorError(f"QEMU took a blockdev-snapshot of {replaced_node} onto a node that cannot exist")

    async def migration_status(self) -> str:
        """query-migrate's ``status``: "none" when this QEMU never migrated, "active" and the like
        while a migration runs, "completed", "failed" or "cancelled" after one."""
        return str((await self.execute("query-migrate")).get("status", "none"))

    async def jobs(self) -> dict[str, JobView]:
        result = await self.execute("query-jobs")
        return {j["id"]: JobView(j["id"], j["status"], int(j.get("current-progress", 0)),
                                 int(j.get("total-progress", 0)), j.get("error")) for j in result}

    async def block(self) -> list[dict[str, Any]]:
        return list(await self.execute("query-block"))

    async def named_nodes(self) -> list[dict[str, Any]]:
        return list(await self.execute("query-named-block-nodes", {"flat": True}))

    async def devices(self) -> list[DeviceInfo]:
        block, fdsets = await asyncio.gather(self.block(), self.fdsets())
        return devices_from_query_block(block, fdsets)

    async def observe(self, needs: frozenset[str], dest_state: tuple[str, ...] = ()) -> Observation:
        """What the state machine needs (``needs``: see protocol.needs). Parts not asked for stay
        empty. Raises like :meth:`execute`; whether QEMU is gone is the caller's question."""
        # Sent together (QMP pipelines commands and answers them in order): one round trip
        # instead of up to four, which counts while the guest is paused.
        run_state, migration, jobs, block, named, fdsets, graph = await asyncio.gather(
            self.run_state() if "status" in needs else _value(""),
            self.migration_status() if "migration" in needs else _value(""),
            self.jobs() if "jobs" in needs else _value({}),
            self.block() if "block" in needs else _value([]),
            self.named_nodes() if "nodes" in needs or "graph" in needs else _value([]),
            self.fdsets() if "fdsets" in needs else _value({}),
            self.execute("x-debug-query-block-graph") if "graph" in needs else _value({}))
        device_nodes = {_device_key(entry): entry["inserted"]["node-name"]
                        for entry in block if entry.get("inserted")}
        device_images = ({key: image_below(root, named, graph) for key, root in device_nodes.items()}
                         if "graph" in needs else {})
        in_use = {str(n.get("file")) for n in named}
        node_cache = {str(n["node-name"]): (bool((n.get("cache") or {}).get("direct")), str(n.get("file", "")))
                      for n in named if n.get("node-name")}
        return Observation(alive=True, run_state=run_state, migration=migration, jobs=jobs, device_nodes=device_nodes,
                           device_images=device_images, node_cache=node_cache,
                           nodes=frozenset(str(n["node-name"]) for n in named if n.get("node-name")),
                           unused_fdsets=frozenset(i for i in fdsets if fdset_path(i) not in in_use),
                           dest_state=dest_state)


async def _value(value: T) -> T:
    return value


def _device_key(entry: Mapping[str, Any]) -> str:
    return str(entry.get("qdev") or entry.get("device") or "")


def qdev_id(qdev: str) -> str | None:
    """'/machine/peripheral/vda/virtio-backend' -> 'vda'; anonymous devices have no id."""
    parts = qdev.strip("/").split("/")
    if len(parts) >= 3 and parts[0] == "machine" and parts[1] == "peripheral":
        return parts[2]
    if qdev and "/" not in qdev:
        return qdev
    return None


def fdset_path(fdset_id: int) -> str:
    return f"/dev/fdset/{fdset_id}"


def devices_from_query_block(block: Iterable[Mapping[str, Any]],
                             fdsets: Mapping[int, str] | None = None) -> list[DeviceInfo]:
    """Disks as ``query-block`` shows them; a file QEMU opened from one of blockcopy's fd sets is
    named by the path blockcopy passed in (``fdsets``: id -> path)."""
    by_fdset = {fdset_path(i): path for i, path in (fdsets or {}).items()}
    devices = []
    for entry in block:
        inserted = entry.get("inserted")
        if not inserted:
            continue  # an empty CD-ROM drive and the like
        image = inserted.get("image", {})
        while image.get("format") in FILTER_DRIVERS and image.get("backing-image"):
            image = image["backing-image"]  # a filter (throttle...) shows the image below as its backing
        filename = str(inserted["file"]) if image is inserted.get("image") else str(image.get("filename", ""))
        chain = []
        backing = image.get("backing-image")
        backing_format = backing.get("format") if backing else None
        while backing:
            chain.append(str(backing.get("filename")))
            backing = backing.get("backing-image")
        qid = qdev_id(str(entry.get("qdev") or ""))
        drive = str(entry.get("device") or "") or None
        devices.append(DeviceInfo(
            name=qid or drive or str(inserted["node-name"]), qdev_id=qid, drive_id=drive,
            device_key=_device_key(entry), node=str(inserted["node-name"]),
            file=by_fdset.get(filename, filename), format=str(image.get("format") or inserted["drv"]),
            virtual_size=int(image.get("virtual-size", 0)),
            backing_chain=tuple(chain), backing_format=backing_format, read_only=bool(inserted.get("ro"))))
    return devices


async def _quiet_disconnect(client: QMPClient) -> None:
    try:
        await client.disconnect()
    except Exception as exc:  # the connection is being dropped anyway; nothing to report
        log.debug("disconnect: %s", exc)
