"""The SQLite journal: durability settings, round trips, and refusing what it cannot read."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
from pathlib import Path

import pytest
from conftest import Blockcopy

from blockcopy.errors import JournalError, StaleRecord
from blockcopy.journal import SCHEMA_VERSION, Journal
from blockcopy.records import Authority, DiskRecord, Goal, Operation, Outcome, Phase, Stage


def _op() -> Operation:
    d = DiskRecord(name="vda", device_key="/machine/peripheral/vda/virtio-backend", source_node="n",
                   source_file="/s", source_format="qcow2", source_file_node=None, virtual_size=1,
                   dest_path="/d", dest_format="raw", dest_node="bc-x-0", job_id="blockcopy-x-0")
    return Operation(id="x", domain="vm", goal=Goal.PIVOT, phase=Phase.STARTING, disks=(d,))


def test_wal_and_full_sync(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    assert j._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert j._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert j._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_round_trip_and_history(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    saved = j.save(_op(), "planned", new=True)
    assert saved.created_at > 0 and saved.ended_at is None
    finished = dataclasses.replace(saved.with_disk(0, stage=Stage.STARTED, pivoted=True), phase=Phase.DONE,
                                   outcome=Outcome.PIVOTED, authoritative=Authority.DESTINATION, warnings=("w",))
    done = j.save(finished, "done")
    again = Journal(tmp_path).get("x")
    assert again == done
    assert again is not None and again.ended_at is not None and again.outcome is Outcome.PIVOTED
    assert [s.note for s in j.steps("x")] == ["planned", "done"]
    assert j.operations(unfinished=True) == []
    assert [o.id for o in j.operations(domain="vm")] == ["x"]


def test_a_save_never_replaces_another_operations_record(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    first = j.save(_op(), "planned", new=True)
    with pytest.raises(JournalError, match="taken already"):
        j.save(dataclasses.replace(_op(), domain="other"), "planned", new=True)
    with pytest.raises(JournalError, match="not in the journal"):
        j.save(dataclasses.replace(_op(), domain="other"), "update")  # same id, another domain
    with pytest.raises(JournalError, match="not in the journal"):
        j.save(dataclasses.replace(_op(), id="never-planned"), "update")
    assert j.get("x") == first and [o.id for o in j.operations()] == ["x"]


def test_state_directory_and_journal_are_private_even_if_the_directory_existed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o777)
    state.chmod(0o777)
    (state / Journal.FILENAME).touch(mode=0o666)
    (state / Journal.FILENAME).chmod(0o666)
    Journal(state).close()
    assert state.stat().st_mode & 0o777 == 0o711  # others may only traverse it (to the daemon's socket)
    assert (state / Journal.FILENAME).stat().st_mode & 0o777 == 0o600


def test_schema_1_journal_is_upgraded_in_place(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / Journal.FILENAME)
    db.executescript("CREATE TABLE domains (name TEXT PRIMARY KEY, qmp_socket TEXT NOT NULL, attached_at REAL "
                     "NOT NULL); INSERT INTO domains VALUES ('old', '/run/old.qmp', 1.0); PRAGMA user_version=1;")
    db.close()
    j = Journal(tmp_path)
    assert j._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    domain = j.domain("old")
    assert domain is not None and domain.qmp_socket == "/run/old.qmp" and domain.qemu_pid is None


def test_a_full_file_system_is_a_journal_error_and_nothing_is_saved(tmpfs) -> None:
    where = tmpfs("1m")
    j = Journal(where)
    saved = j.save(_op(), "planned", new=True)
    filler = where / "filler"
    with open(filler, "wb") as out:  # fill the file system to the last block
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    big = dataclasses.replace(saved, warnings=("x" * 200_000,))
    events = j.last_event_seq()
    with pytest.raises(JournalError, match="cannot write the journal"):
        j.save(dataclasses.replace(big, phase=Phase.COPYING), "step")
    filler.unlink()
    assert j.get("x") == saved  # the failed save left the previous record
    assert j.last_event_seq() == events  # ... and wrote none of its events


def test_newer_schema_is_refused_untouched(tmp_path: Path, bc: Blockcopy) -> None:
    Journal(bc.state_dir).close()
    db = sqlite3.connect(bc.state_dir / Journal.FILENAME)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    before = (bc.state_dir / Journal.FILENAME).read_bytes()
    with pytest.raises(JournalError, match="newer than this blockcopy"):
        Journal(bc.state_dir)
    result = bc("jobs")
    assert result.returncode == 3 and "use a newer blockcopy" in result.stderr
    assert (bc.state_dir / Journal.FILENAME).read_bytes() == before


def test_unreadable_journal_is_a_clear_error(bc: Blockcopy) -> None:
    bc.state_dir.mkdir(parents=True)
    garbage = b"this is not a database" * 100
    (bc.state_dir / Journal.FILENAME).write_bytes(garbage)
    result = bc("recover")
    assert result.returncode == 3 and "cannot read the journal" in result.stderr
    assert (bc.state_dir / Journal.FILENAME).read_bytes() == garbage


def test_missing_journal_is_a_clear_error_not_nothing_to_do(bc: Blockcopy) -> None:
    for command in (["recover"], ["jobs"], ["status", "abcd1234"], ["domains"]):
        result = bc(*command)
        assert result.returncode == 3, command
        assert "no journal at" in result.stderr and "--state-dir" in result.stderr
    assert not bc.state_dir.exists()  # nothing was created either


def test_a_process_recorded_without_boot_id_or_namespace_is_still_recognised() -> None:
    """Records of earlier versions name the process by pid and start time only."""
    from blockcopy.qemuproc import QemuProcess

    now = QemuProcess(4242, 777, "boot-a", 11)
    assert QemuProcess(4242, 777).same_as(now) and now.same_as(QemuProcess(4242, 777))
    assert not QemuProcess(4242, 778).same_as(now)
    assert not QemuProcess(4242, 777, "boot-b").same_as(now)
    assert not QemuProcess(4242, 777, "boot-a", 12).same_as(now)
    assert QemuProcess(4242, 777, "", 1).state() == "unknown"  # seen from another PID namespace: cannot tell
    assert QemuProcess(os.getpid(), 0, "", 0).state() == "gone"  # wrong start time: another process


def test_a_record_with_fields_of_a_later_version_still_reads() -> None:
    from blockcopy.records import DiskRecord, Goal, Operation, Phase

    disk = DiskRecord(name="vda", device_key="k", source_node="s", source_file="/f", source_format="qcow2",
                      source_file_node="sf", virtual_size=1, dest_path="/d", dest_format="qcow2", dest_node="n",
                      job_id="j", source_below=("sf", "base"))
    op = Operation(id="i", domain="vm", goal=Goal.PIVOT, phase=Phase.PIVOTING, disks=(disk,))
    data = op.to_dict()
    data["later"] = 1
    data["disks"][0]["later"] = 2
    assert Operation.from_dict(data) == op


def test_events_are_written_with_their_record_in_order(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    op = j.save(_op(), "planned", new=True)
    op = j.save(dataclasses.replace(op.with_disk(0, progress_current=5, progress_total=10), phase=Phase.COPYING),
                "all mirrors started")
    op = j.save(op.with_disk(0, progress_current=10))  # a progress save: no note
    op = j.save(dataclasses.replace(op, ready_at=2.0, goal=Goal.FINISH))
    other = Journal(tmp_path)  # another process saves in between: its record, not a stale one, is compared
    op = other.save(dataclasses.replace(op, bandwidth=3), "speed")
    op = j.save(dataclasses.replace(op, phase=Phase.DONE, outcome=Outcome.PIVOTED, authoritative=Authority.DESTINATION,
                                    stop_ts=1.0, resume_ts=1.004), "done")
    kinds = [(e.kind, e.job) for e in j.events_after(0)]
    assert [k for k, _ in kinds] == ["created", "state", "progress", "progress", "goal", "ready", "speed", "state",
                                     "pause", "outcome"]
    assert {job for _, job in kinds} == {"x"}
    seqs = [e.seq for e in j.events_after(0)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert [e.seq for e in j.events_after(seqs[4])] == seqs[5:]
    assert j.events_after(0)[-1].data["outcome"] == "pivoted"
    j.save(op, "done again")  # nothing changed: no event
    assert j.last_event_seq() == seqs[-1]


def test_a_wait_that_holds_a_ready_job_is_an_event_when_it_begins_and_when_it_ends(tmp_path: Path) -> None:
    """A pivot held by a memory dump (``Operation.waiting``) reaches the event stream, and so the
    daemon's clients and their progress bars, not only `status`: its reason, then "" once it ends."""
    j = Journal(tmp_path)
    op = j.save(dataclasses.replace(_op(), phase=Phase.COPYING, ready_at=1.0), "planned", new=True)
    op = j.save(dataclasses.replace(op, waiting="a dump holds the guest"), "wait")
    op = j.save(op.with_disk(0, progress_current=1))  # unchanged wait: no second event
    op = j.save(dataclasses.replace(op, phase=Phase.PIVOTING, waiting=""), "pivot")
    waits = [e.data["reason"] for e in j.events_after(0) if e.kind == "waiting"]
    assert waits == ["a dump holds the guest", ""]
    # a goal asked or withdrawn outside the protocol (finish, abort, an interrupted wait) takes the
    # wait with it; a pivot asked again keeps it
    held = dataclasses.replace(op, phase=Phase.COPYING, waiting="a dump holds the guest")
    assert [held.with_goal(g).waiting for g in (Goal.COPY, Goal.FINISH, Goal.ABORT)] == ["", "", ""]
    assert held.with_goal(Goal.PIVOT).waiting == "a dump holds the guest"


def test_schema_2_journal_is_upgraded_for_request_ids_and_events(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / Journal.FILENAME)
    record = json.dumps(_op().to_dict())
    db.executescript(
        "CREATE TABLE domains (name TEXT PRIMARY KEY, qmp_socket TEXT NOT NULL, attached_at REAL NOT NULL, "
        "qemu_pid INTEGER, qemu_start INTEGER); "
        "CREATE TABLE operations (id TEXT PRIMARY KEY, domain TEXT NOT NULL, phase TEXT NOT NULL, "
        "created_at REAL NOT NULL, updated_at REAL NOT NULL, record TEXT NOT NULL); "
        "CREATE TABLE steps (seq INTEGER PRIMARY KEY AUTOINCREMENT, op_id TEXT NOT NULL, at REAL NOT NULL, "
        "phase TEXT NOT NULL, note TEXT NOT NULL); PRAGMA user_version=2;")
    db.execute("INSERT INTO operations VALUES ('x', 'vm', 'starting', 1.0, 1.0, ?)", (record,))
    db.commit()
    db.close()
    j = Journal(tmp_path)
    assert j._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    old = j.get("x")
    assert old is not None and old.client_key is None and old.speed_applied
    j.save(dataclasses.replace(_op(), id="y", client_key="k"), "planned", new=True)
    assert j.by_client_key("k") is not None and j.by_client_key("k").id == "y"  # type: ignore[union-attr]
    with pytest.raises(JournalError, match="request id k is taken"):
        j.save(dataclasses.replace(_op(), id="z", client_key="k"), "planned", new=True)
    assert [e.kind for e in j.events_after(0)] == ["created"]


def test_the_wal_is_checkpointed_between_pivots_never_inside_one(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    checkpointed: list[Phase] = []
    real = j._checkpoint_if_large

    def spy() -> None:
        checkpointed.append(j._parsed["x"].phase)
        real()

    j._checkpoint_if_large = spy  # type: ignore[method-assign]
    op = j.save(dataclasses.replace(_op(), warnings=("x" * 20000,)), "planned", new=True)
    wal = tmp_path / f"{Journal.FILENAME}-wal"
    for phase in (Phase.PIVOTING, Phase.FINALIZING, Phase.SETTLING, Phase.ABORTING):
        for i in range(100):  # ~ 6 pages a save, all while a guest may be paused
            op = j.save(dataclasses.replace(op, phase=phase, error=str(i)), "step")
    assert checkpointed == [Phase.STARTING]
    assert wal.stat().st_size > 4 * 1024 * 1024  # past SQLite's own threshold, and not checkpointed
    # Outside pauses the WAL is checkpointed once large: it is reused from its start, not grown.
    other = Journal(tmp_path / "other")
    copying = other.save(dataclasses.replace(_op(), phase=Phase.COPYING, warnings=("x" * 20000,)), "planned",
                         new=True)
    for i in range(600):
        copying = other.save(dataclasses.replace(copying, error=str(i)), "step")
    assert (tmp_path / "other" / f"{Journal.FILENAME}-wal").stat().st_size < 6 * 1024 * 1024
    assert other.get("x") == copying


def test_a_save_made_from_a_record_another_writer_replaced_is_refused(tmp_path: Path) -> None:
    """Two drivers on one job (a defect elsewhere) fail loudly instead of writing over each other."""
    first, second = Journal(tmp_path), Journal(tmp_path)
    op = first.save(_op(), "planned", new=True)
    theirs = second.save(dataclasses.replace(op, phase=Phase.DONE, outcome=Outcome.PIVOTED), "done")
    with pytest.raises(StaleRecord, match="another writer"):
        first.save(dataclasses.replace(op, phase=Phase.COPYING), "stale step")
    assert first.get("x") == theirs
    assert [e.kind for e in first.events_after(0)] == ["created", "state", "outcome"]


def test_two_saves_made_from_one_record_in_one_process_are_refused_the_second_time(tmp_path: Path) -> None:
    """The journal's own cache of the last record it saved must not hide a second writer in the same
    process (two tasks of the daemon on one job)."""
    j = Journal(tmp_path)
    op = j.save(_op(), "planned", new=True)
    mine = j.save(dataclasses.replace(op, phase=Phase.COPYING), "first")
    with pytest.raises(StaleRecord, match="another writer"):
        j.save(dataclasses.replace(op, phase=Phase.ABORTING), "second, from the same record")
    assert Journal(tmp_path).get("x") == mine
    assert [e.data.get("phase") for e in j.events_after(0) if e.kind == "state"] == ["copying"]


def test_a_record_as_plain_data_is_what_dataclasses_make_of_it() -> None:
    """The hand-made ``to_dict`` (kept fast for the pivot's pause) leaves no field out and makes
    every tuple a list, as ``dataclasses.asdict`` would."""
    def listed(value: object) -> object:
        if isinstance(value, tuple | list):
            return [listed(v) for v in value]
        if isinstance(value, dict):
            return {k: listed(v) for k, v in value.items()}
        return value

    disk = dataclasses.replace(_op().disks[0], dest_args={"driver": "qcow2", "file": {"driver": "file",
                                                                                       "x": [1, 2]}},
                               source_below=("a", "b"), dest_owner=(1, 2), pivoted=True)
    op = dataclasses.replace(_op(), disks=(disk, disk), warnings=("w",), identical=(True, False),
                             outcome=Outcome.PIVOTED, authoritative=Authority.BOTH, client_key="k")
    plain = op.to_dict()
    assert plain == listed(dataclasses.asdict(op))
    assert json.loads(json.dumps(plain)) == plain  # JSON through and through
    assert Operation.from_dict(plain) == op


def test_the_wal_is_emptied_as_a_pivot_begins_so_the_pauses_commits_do_not_grow_it(tmp_path: Path) -> None:
    """Commits that overwrite the WAL fsync faster than commits that grow it (0.6 against 0.8 ms
    here), and two of them fall inside the guest's pause."""
    j = Journal(tmp_path)
    op = j.save(dataclasses.replace(_op(), phase=Phase.COPYING, warnings=("x" * 20000,)), "planned", new=True)
    for i in range(30):
        op = j.save(dataclasses.replace(op, error=str(i)), "progress")
    wal = tmp_path / f"{Journal.FILENAME}-wal"
    before = wal.stat().st_size
    op = j.save(dataclasses.replace(op, phase=Phase.PIVOTING), "pivot")
    for phase in (Phase.FINALIZING, Phase.SETTLING):
        op = j.save(dataclasses.replace(op, phase=phase), "in the pause")
    assert wal.stat().st_size == before
    # ... and not when the daemon says another guest is paused now (a checkpoint takes milliseconds).
    other = Journal(tmp_path / "other")
    other.may_checkpoint = lambda _domain: False
    op = other.save(dataclasses.replace(_op(), phase=Phase.COPYING, warnings=("x" * 20000,)), "planned", new=True)
    for i in range(30):
        op = other.save(dataclasses.replace(op, error=str(i)), "progress")
    wal = tmp_path / "other" / f"{Journal.FILENAME}-wal"
    before = wal.stat().st_size
    op = other.save(dataclasses.replace(op, phase=Phase.PIVOTING), "pivot")
    assert wal.stat().st_size > before


def test_a_new_journals_name_is_made_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite fsyncs the journal's file, not the directory entry that names it: a new journal's
    directory is fsynced once, or a power cut could lose the file with every record in it."""
    import stat as stat_

    synced: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat_.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    Journal(tmp_path / "state").close()
    assert True in synced, "the state directory was never fsynced"
    synced.clear()
    Journal(tmp_path / "state").close()  # (an existing journal: nothing to do)
    assert True not in synced
