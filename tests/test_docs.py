"""The README's command and option tables match the command line (pure: no QEMU).

Users read the tables, scripts are written from them: an option the parser takes and the README
does not list, or the reverse, is a doc bug that review once found only by eye (a `copy` row that
had drifted out of its table into a paragraph)."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from blockcopy.cli import build_parser

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _table_after(marker: str) -> list[str]:
    """The rows of the first Markdown table from the line `marker` on (header and rule excluded)."""
    lines = README.splitlines()
    start = lines.index(marker)
    rows: list[str] = []
    for line in lines[start:]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return rows[2:]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(parser: argparse.ArgumentParser, hidden: set[str]) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings
            if s.startswith("--") and a.help is not argparse.SUPPRESS and s not in hidden}


def _first_cells(rows: list[str]) -> str:
    return "\n".join(row.split(" | ")[0] for row in rows)


GLOBAL = {"--help", "--json", "--state-dir", "--verbose", "--qmp-timeout", "--transition-timeout", "--socket",
          "--no-daemon", "--version"}


def test_every_command_has_a_row_in_the_commands_table_and_every_row_a_command() -> None:
    rows = _table_after("| command | what it does |")
    named = {re.match(r"\| `(\w+)", row).group(1) for row in rows}  # type: ignore[union-attr]
    assert named == set(_subparsers())


def test_every_copy_option_is_in_the_copy_options_table_and_every_row_is_an_option() -> None:
    rows = _table_after("`copy` options:")
    in_table = set(re.findall(r"`(--[a-z-]+)", _first_cells(rows)))
    assert in_table == _options(_subparsers()["copy"], GLOBAL) - {"--disk"}  # (--disk: in the commands table)
    assert "--disk DISK=DEST" in README


def test_every_option_of_every_command_is_in_the_readme() -> None:
    missing = {f"{name} {opt}" for name, parser in [("blockcopy", build_parser()), *_subparsers().items()]
               for opt in _options(parser, set()) - {"--help", "--version"}
               if not re.search(rf"[`\[ ]{opt}(?![\w-])", README)}
    assert missing == set()


def test_every_option_of_the_commands_table_exists() -> None:
    parsers = _subparsers()
    for row in _table_after("| command | what it does |"):
        command = re.match(r"\| `(\w+)", row).group(1)  # type: ignore[union-attr]
        for opt in re.findall(r"\[?(--[a-z-]+)", row.split(" | ")[0]):
            assert opt in _options(parsers[command], set()), (command, opt)


def test_the_default_mode_is_write_blocking_everywhere() -> None:
    """README: `--mode` defaults to write-blocking, so a copy always converges. The default is set
    in the CLI, the Python API's CopyRequest, the journal's records and the HTTP API (review 42:
    nothing checked that they agree)."""
    from blockcopy import CopyRequest
    from blockcopy.records import Goal, Operation, Phase
    from blockcopy.service.api import CopyBody

    copy = _subparsers()["copy"].parse_args(["vm", "vda", "/d.qcow2"])
    assert copy.mode == "write-blocking"
    assert CopyRequest("vm", [("vda", "/d.qcow2")]).mode == "write-blocking"
    assert Operation(id="x", domain="d", goal=Goal.COPY, phase=Phase.STARTING, disks=()).mode == "write-blocking"
    assert CopyBody(domain="vm", disks=[{"disk": "vda", "destination": "/d.qcow2"}]).mode == "write-blocking"
    assert "`--mode write-blocking\\|background` | default `write-blocking`" in README


def _json_bullet(first: str) -> set[str]:
    """The backticked names of the `--json` interface's bullet that begins with ``first``."""
    section = README[README.index("## The `--json` interface"):README.index("## Python API")]
    bullet = next(b for b in section.split("\n- ") if b.startswith(first))
    return set(re.findall(r"`([a-z_]+)`", bullet))


def test_every_json_field_is_documented() -> None:
    """Field names are stable and documented (README: The --json interface): a field added, or
    renamed, without the README saying so fails here (review 42: ten fields no test named)."""
    from blockcopy import views
    from blockcopy.journal import Domain
    from blockcopy.monitor import DeviceInfo
    from blockcopy.records import DiskRecord, Goal, Operation, Phase

    disk = DiskRecord(name="vda", device_key="vda", source_node="n", source_file="/s", source_format="qcow2",
                      source_file_node=None, virtual_size=1, dest_path="/d", dest_format="qcow2", dest_node="b",
                      job_id="j")
    view = views.operation_view(Operation(id="x", domain="d", goal=Goal.COPY, phase=Phase.COPYING, disks=(disk,)))
    section = README[README.index("## The `--json` interface"):README.index("## Python API")]
    bullet = next(b for b in section.split("\n- ") if b.startswith("`status`"))
    top, _, per_disk = bullet.partition("and `disks`: a list of")
    # (each level against its own list: a new field named like another level's would not pass)
    assert set(view) - set(re.findall(r"`([a-z_]+)`", top)) == {"disks"}
    assert set(view["disks"][0]) - set(re.findall(r"`([a-z_]+)`", per_disk)) == set()
    assert set(view["progress"]) == set(re.findall(r"`progress` \(([^)]*)\)", top)[0].replace("`", "")
                                        .replace(" bytes", "").replace(",", " ").split())
    device = DeviceInfo(**{f.name: () if f.name == "backing_chain" else None  # type: ignore[arg-type]
                           for f in dataclasses.fields(DeviceInfo)})
    assert set(views.device_view(device)) - _json_bullet("`disks`") == set()
    domain = Domain(**{f.name: None for f in dataclasses.fields(Domain)})  # type: ignore[arg-type]
    assert set(views.domain_view(domain)) - _json_bullet("`domains`") == set()
