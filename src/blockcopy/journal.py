"""The write-ahead journal: SQLite in WAL mode with ``synchronous=FULL``.

Each save is one transaction that commits (and so fsyncs) before the caller goes on to the step the
record describes. The whole record is stored as JSON next to the few columns that queries need; a
``steps`` table keeps the history of every save for ``blockcopy status --log``-style forensics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from blockcopy import events, faults
from blockcopy.errors import JournalError, StaleRecord
from blockcopy.qemuproc import QemuProcess
from blockcopy.records import Operation

SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS domains (
    name TEXT PRIMARY KEY,
    qmp_socket TEXT NOT NULL,
    attached_at REAL NOT NULL,
    qemu_pid INTEGER,
    qemu_start INTEGER
);
CREATE TABLE IF NOT EXISTS operations (
    id TEXT PRIMARY KEY,
    domain TEXT NOT NULL,
    phase TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    record TEXT NOT NULL,
    client_key TEXT
);
CREATE INDEX IF NOT EXISTS operations_domain ON operations(domain, phase);
CREATE TABLE IF NOT EXISTS steps (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op_id TEXT NOT NULL,
    at REAL NOT NULL,
    phase TEXT NOT NULL,
    note TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS steps_op ON steps(op_id, seq);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    op_id TEXT NOT NULL,
    data TEXT NOT NULL
);
"""
#: After the migrations: they may add the columns these index.
_INDEXES = ["CREATE UNIQUE INDEX IF NOT EXISTS operations_client_key ON operations(client_key)"]


#: Upgrades from each older schema version (``CREATE ... IF NOT EXISTS`` covers new tables).
_MIGRATIONS = {
    1: ["ALTER TABLE domains ADD COLUMN qemu_pid INTEGER", "ALTER TABLE domains ADD COLUMN qemu_start INTEGER"],
    2: ["ALTER TABLE operations ADD COLUMN client_key TEXT"],
}


@dataclass(frozen=True)
class Domain:
    name: str
    qmp_socket: str
    attached_at: float
    qemu_pid: int | None = None  # the QEMU process that answered at attach (see qemuproc.py)
    qemu_start: int | None = None


@dataclass(frozen=True)
class StepEntry:
    at: float
    phase: str
    note: str


class Journal:
    """One SQLite database in the state directory."""

    FILENAME = "journal.sqlite3"

    def __init__(self, state_dir: Path, *, create: bool = True) -> None:
        self.path = state_dir / self.FILENAME
        if not self.path.exists() and not create:
            raise JournalError(f"no journal at {self.path}: nothing was ever recorded in this state directory. "
                               "Pass the --state-dir (or BLOCKCOPY_STATE_DIR) that blockcopy used, or start "
                               "with `blockcopy attach`")
        umask = os.umask(0o077)  # the journal and SQLite's -wal and -shm files: owner only
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Job records name image paths and sockets: private, even in a directory that existed
            # (if it is blockcopy's user's own; another user's directory is left as it is). Others
            # may only traverse it (0711), to reach the daemon's socket when its group is allowed.
            st = os.stat(state_dir)
            if st.st_uid == os.geteuid() and st.st_mode & 0o066:
                os.chmod(state_dir, stat.S_IMODE(st.st_mode) & ~0o066)
            new = not os.path.lexists(self.path)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.fchmod(fd, 0o600)
            os.close(fd)
            if new:  # its name is as durable as its records (SQLite syncs the file, not its directory)
                dir_fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(dir_fd)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # (file systems that cannot sync a directory say so)
                        raise
                finally:
                    os.close(dir_fd)
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # Checkpoints are taken by save() between pivots, not by whichever commit fills the WAL:
            # that may be the one inside a guest's pause (a checkpoint copies and fsyncs megabytes).
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            # ... and a WAL that was checkpointed is cut back to that size when it is reused.
            self._db.execute(f"PRAGMA journal_size_limit={CHECKPOINT_BYTES}")
            if self._version() < SCHEMA_VERSION:
                with self._transaction():
                    version = self._version()  # again, inside the lock: another process may have upgraded
                    if version < SCHEMA_VERSION:
                        for statement in filter(str.strip, _SCHEMA.split(";")):
                            self._db.execute(statement)
                        for old in range(version or SCHEMA_VERSION, SCHEMA_VERSION):
                            for statement in _MIGRATIONS[old]:
                                if not self._has_column(statement):  # (a table this version created has it)
                                    self._db.execute(statement)
                        for statement in _INDEXES:
                            self._db.execute(statement)
                        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"cannot read the journal {self.path}: {exc}. Nothing was changed; "
                               "move the file aside only if you know its jobs are finished.") from exc
        except OSError as exc:
            raise JournalError(f"cannot open the state directory {state_dir}: {exc}") from exc
        finally:
            os.umask(umask)
        #: called after a save that wrote events has committed (the daemon wakes its event streams)
        self.on_events: Callable[[], None] | None = None
        #: parsed records by id, with the ``updated_at`` they were saved with: a record whose row
        #: still has that ``updated_at`` is not parsed again (listing jobs, a save's previous record)
        self._parsed: dict[str, Operation] = {}
        #: whether a save may checkpoint the WAL now (the daemon: not while a guest is paused for a
        #: pivot); the argument, when given, is a domain that is about to be paused by the saving job
        #: itself (it holds its domain's pivot guard already, but the guest still runs)
        self.may_checkpoint: Callable[[str | None], bool] = lambda _domain: True

    def _has_column(self, statement: str) -> bool:
        """Whether an ``ALTER TABLE t ADD COLUMN c ...`` statement's column exists already."""
        words = statement.split()
        if words[:2] != ["ALTER", "TABLE"] or words[3:5] != ["ADD", "COLUMN"]:
            return False
        return any(row[1] == words[5] for row in self._db.execute(f"PRAGMA table_info({words[2]})"))

    def _version(self) -> int:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"journal {self.path} has schema version {version}, newer than this blockcopy "
                f"understands ({SCHEMA_VERSION}); use a newer blockcopy. Nothing was changed.")
        return version

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One durable transaction. A failure to write (a full or read-only file system, an I/O
        error) is a :class:`JournalError`: the step it was for must not be taken."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise JournalError(f"cannot write the journal {self.path}: {exc}") from exc

    # --- domains ---------------------------------------------------------------------------------

    def add_domain(self, name: str, qmp_socket: str, qemu: QemuProcess | None = None) -> Domain:
        domain = Domain(name, qmp_socket, time.time(), qemu.pid if qemu else None, qemu.start_time if qemu else None)
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO domains (name, qmp_socket, attached_at, qemu_pid, qemu_start) "
                             "VALUES (?, ?, ?, ?, ?)", dataclasses.astuple(domain))
        return domain

    def remove_domain(self, name: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM domains WHERE name = ?", (name,))

    def domain(self, name: str) -> Domain | None:
        row = self._db.execute(f"SELECT {_DOMAIN_COLUMNS} FROM domains WHERE name = ?", (name,)).fetchone()
        return Domain(*row) if row else None

    def domains(self) -> list[Domain]:
        rows = self._db.execute(f"SELECT {_DOMAIN_COLUMNS} FROM domains ORDER BY name")
        return [Domain(*row) for row in rows]

    # --- operations ------------------------------------------------------------------------------

    def save(self, op: Operation, note: str = "", *, new: bool = False) -> Operation:
        """Write ``op`` durably (one fsynced transaction) and return it as stored.

        ``new``: the first record of an operation; refused if the id is taken, so that a save
        never replaces another operation's record. Other saves update a record of the same
        operation only (same id and domain).

        :raise StaleRecord: ``op`` was made from a record that is no longer the saved one (another
            writer saved since): nothing was saved.
        :raise JournalError: the journal could not be written; nothing was saved.
        """
        now = time.time()
        basis = op.updated_at  # the saved record this one was made from
        ended = now if op.phase.value == "done" and op.ended_at is None else op.ended_at
        op = dataclasses.replace(op, created_at=op.created_at or now, updated_at=now, ended_at=ended)
        record = json.dumps(op.to_dict(), sort_keys=True)
        if (op.phase.value == "pivoting" and self._parsed.get(op.id, op).phase is not op.phase
                and self.may_checkpoint(op.domain)):
            # The guest is about to be paused, and the pivot's records are committed inside that
            # pause: empty the WAL now, so that this commit starts it afresh (with the header's own
            # fsync) and the pause's commits overwrite it, which fsyncs faster than growing it.
            self._checkpoint()
        with self._transaction():
            previous = None
            if new:
                try:
                    self._db.execute(
                        "INSERT INTO operations (id, domain, phase, created_at, updated_at, record, client_key) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (op.id, op.domain, op.phase.value, op.created_at, op.updated_at, record, op.client_key))
                except sqlite3.IntegrityError:
                    key_taken = op.client_key is not None and self.by_client_key(op.client_key) is not None
                    taken = f"request id {op.client_key}" if key_taken else f"job id {op.id}"
                    raise JournalError(f"{taken} is taken already; nothing was started") from None
            else:
                previous = self._replace_row(op, basis, record)
            if note:
                self._db.execute("INSERT INTO steps (op_id, at, phase, note) VALUES (?, ?, ?, ?)",
                                 (op.id, now, op.phase.value, note))
            happened = events.derive(previous, op, note)
            for kind, data in happened:
                self._db.execute("INSERT INTO events (at, kind, op_id, data) VALUES (?, ?, ?, ?)",
                                 (now, kind, op.id, json.dumps(data, sort_keys=True)))
        self._remember(op)
        if op.phase.value in _QUIET_PHASES and self.may_checkpoint(None):
            self._checkpoint_if_large()
        if happened and self.on_events is not None:
            self.on_events()
        if note:  # a protocol step, not a progress update
            faults.point(f"journal:{op.phase.value}")
        return op

    def _replace_row(self, op: Operation, basis: float, record: str) -> Operation:
        """Replace ``op``'s row if it is still the record ``op`` was made from (``basis``, its
        ``updated_at``; 0: any); the record it replaced. The common case (this process saved the
        row last) is one statement: no row read and no JSON parsed while a guest is paused.

        :raise StaleRecord: another writer saved since.
        :raise JournalError: there is no such row.
        """
        known = self._parsed.get(op.id)
        if basis and known is not None and known.updated_at == basis and known.domain == op.domain:
            cursor = self._db.execute(
                "UPDATE operations SET phase = ?, updated_at = ?, record = ? WHERE id = ? AND updated_at = ?",
                (op.phase.value, op.updated_at, record, op.id, basis))
            if cursor.rowcount == 1:
                return known
        previous = self._previous(op)
        if basis and previous.updated_at != basis:
            raise StaleRecord(f"job {op.id} was saved by another writer since this one read it; nothing "
                              "was saved. Two blockcopy processes (or tasks) must not drive one job: run "
                              "`blockcopy status` and `blockcopy recover`")
        self._db.execute("UPDATE operations SET phase = ?, updated_at = ?, record = ? WHERE id = ?",
                         (op.phase.value, op.updated_at, record, op.id))
        return previous

    def _checkpoint_if_large(self) -> None:
        try:
            large = os.stat(f"{self.path}-wal").st_size > CHECKPOINT_BYTES
        except OSError:
            return
        if large:
            self._checkpoint()

    def _checkpoint(self) -> None:
        with contextlib.suppress(sqlite3.Error):  # (another connection reading: the next save retries)
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _previous(self, op: Operation) -> Operation:
        """The record ``op`` replaces (for its events); not parsed again when this process has it
        (no JSON to parse inside a pivot's pause)."""
        row = self._db.execute(f"SELECT {_RECORD} FROM operations WHERE id = ? AND domain = ?",
                               (op.id, op.domain)).fetchone()
        if row is None:
            raise JournalError(f"job {op.id} of domain {op.domain} is not in the journal {self.path}")
        return self._load(row)

    def _remember(self, op: Operation) -> Operation:
        if len(self._parsed) > 10000:
            self._parsed.clear()
        self._parsed[op.id] = op
        return op

    def _load(self, row: tuple[str, float, str]) -> Operation:
        """A row of (id, updated_at, record) as an Operation; parsed only when it changed."""
        known = self._parsed.get(row[0])
        if known is not None and known.updated_at == row[1]:
            return known
        return self._remember(_load(row[2]))

    def get(self, op_id: str) -> Operation | None:
        row = self._db.execute(f"SELECT {_RECORD} FROM operations WHERE id = ?", (op_id,)).fetchone()
        return self._load(row) if row else None

    def find(self, prefix: str) -> list[Operation]:
        """Operations whose id starts with ``prefix``."""
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self._db.execute(f"SELECT {_RECORD} FROM operations WHERE id LIKE ? ESCAPE '\\' ORDER BY created_at",
                                (escaped + "%",))
        return [self._load(row) for row in rows]

    def operations(self, *, domain: str | None = None, unfinished: bool = False) -> list[Operation]:
        query = f"SELECT {_RECORD} FROM operations"
        clauses, params = [], []
        if domain is not None:
            clauses.append("domain = ?")
            params.append(domain)
        if unfinished:
            clauses.append("phase != 'done'")
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        query += " ORDER BY created_at"
        return [self._load(row) for row in self._db.execute(query, params)]

    def by_client_key(self, key: str) -> Operation | None:
        """The operation created under the client's idempotency key ``key``, if any."""
        row = self._db.execute(f"SELECT {_RECORD} FROM operations WHERE client_key = ?", (key,)).fetchone()
        return self._load(row) if row else None

    # --- events ----------------------------------------------------------------------------------

    def events_after(self, seq: int, limit: int = 500) -> list[events.Event]:
        """Events with a sequence number above ``seq``, oldest first (see :mod:`blockcopy.events`)."""
        rows = self._db.execute("SELECT seq, at, kind, op_id, data FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                                (seq, limit))
        return [events.Event(row[0], row[1], row[2], row[3], json.loads(row[4])) for row in rows]

    def event_bounds(self) -> tuple[int | None, int]:
        """(the oldest event kept or None, the last ever written), read together: a writer in
        between cannot make the pair disagree."""
        row = self._db.execute("SELECT (SELECT MIN(seq) FROM events), "
                               "(SELECT seq FROM sqlite_sequence WHERE name = 'events')").fetchone()
        return (None if row[0] is None else int(row[0])), int(row[1] or 0)

    def last_event_seq(self) -> int:
        """The sequence number of the last event ever written, kept or pruned (AUTOINCREMENT's
        counter: numbers are never reused), 0 when none was."""
        return self.event_bounds()[1]

    def prune_events(self, keep_seconds: float) -> int:
        """Forget events older than ``keep_seconds`` (the sequence numbers go on). Returns how many."""
        with self._transaction():
            return self._db.execute("DELETE FROM events WHERE at < ?", (time.time() - keep_seconds,)).rowcount

    def steps(self, op_id: str) -> list[StepEntry]:
        rows = self._db.execute("SELECT at, phase, note FROM steps WHERE op_id = ? ORDER BY seq", (op_id,))
        return [StepEntry(*row) for row in rows]


#: The WAL is checkpointed by a save outside a pivot once it is this large (SQLite's own default).
CHECKPOINT_BYTES = 4 * 1024 * 1024
#: Phases in which no guest is paused for a pivot: a save in one of them may checkpoint.
_QUIET_PHASES = frozenset({"starting", "copying", "finishing", "done"})
_DOMAIN_COLUMNS = "name, qmp_socket, attached_at, qemu_pid, qemu_start"
_RECORD = "id, updated_at, record"


def _load(text: str) -> Operation:
    return Operation.from_dict(json.loads(text))
