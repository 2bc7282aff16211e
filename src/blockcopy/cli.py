"""The ``blockcopy`` command: a thin shell over :class:`blockcopy.manager.Manager`.

Text output is for people; ``--json`` output is for programs (fields in :mod:`blockcopy.views`).
Errors go to stderr with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from blockcopy import __version__, nodes, views
from blockcopy.driver import TRANSITION_TIMEOUT, Interrupted, Until
from blockcopy.errors import BlockcopyError, UsageError
from blockcopy.manager import DEFAULT_BUF_SIZE, FORMATS, MODES, PREALLOCATIONS, CopyRequest, Manager
from blockcopy.monitor import Monitor
from blockcopy.records import Goal, Operation, Outcome
from blockcopy.ui import describe, progress_display

EPILOG = """\
Give blockcopy its own QMP socket on each VM, e.g. add to the QEMU command line:
    -qmp unix:/run/blockcopy/NAME.qmp,server=on,wait=off
then `blockcopy attach NAME --qmp /run/blockcopy/NAME.qmp`.
"""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MiB/s") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"bandwidth must be a positive number of MiB/s, not {text}")
    return value


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def _positive_float_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"give a positive number of seconds, not {text}")
    return value


def _size(text: str) -> int:
    """Bytes, with an optional binary suffix: 65536, 512K, 1M, 1G."""
    number, unit = text.strip(), ""
    if number[-1:].upper() in ("K", "M", "G"):
        number, unit = number[:-1], number[-1].upper()
    try:
        value = int(number) * _SIZE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes, or a number with K, M or G"
                                         ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, not {text}")
    return value


def _owner(text: str) -> tuple[int, int]:
    """USER[:GROUP] as names or numbers; the group defaults to the user's."""
    import grp
    import pwd

    user, _, group = text.partition(":")
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if not user.isdigit():
            raise argparse.ArgumentTypeError(f"unknown user {user!r}") from None
        uid, gid = int(user), int(user)
    else:
        uid, gid = entry.pw_uid, entry.pw_gid
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise argparse.ArgumentTypeError(f"unknown group {group!r}") from None
    return uid, gid


def _octal_mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 0660") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"mode {text} is out of range (0000-0777)")
    return value


def _disk_pair(text: str) -> tuple[str, str]:
    disk, sep, dest = text.partition("=")
    if not sep or not disk or not dest:
        raise argparse.ArgumentTypeError(f"expected DISK=DEST, got {text!r}")
    return disk, dest


def _global_options(*, suppress: bool) -> argparse.ArgumentParser:
    """Options accepted before and after the subcommand. The subcommand's copies default to
    SUPPRESS, or argparse would overwrite a value given before the subcommand with the default."""
    common = argparse.ArgumentParser(add_help=False)

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    common.add_argument("--json", action="store_true", default=default(False),
                        help="machine-readable output on stdout")
    common.add_argument("--state-dir", default=default(None), help="journal directory (env BLOCKCOPY_STATE_DIR; "
                        "default /var/lib/blockcopy for root, else $XDG_STATE_HOME/blockcopy)")
    common.add_argument("-v", "--verbose", action="store_true", default=default(False),
                        help="log protocol steps to stderr")
    common.add_argument("--qmp-timeout", type=_positive_float_seconds,
                        default=default(Monitor.DEFAULT_COMMAND_TIMEOUT),
                        metavar="SECONDS", help="how long QEMU may take to answer one QMP command before "
                        f"blockcopy drops the connection and asks again (default {Monitor.DEFAULT_COMMAND_TIMEOUT:g})")
    common.add_argument("--transition-timeout", type=_positive_float_seconds,
                        default=default(TRANSITION_TIMEOUT),
                        metavar="SECONDS", help="how long a pivot, finish or abort may wait for QEMU before "
                        "blockcopy rolls the pivot back, cancels the finish, or gives up for now "
                        f"(default {TRANSITION_TIMEOUT:g})")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _global_options(suppress=True)
    parser = argparse.ArgumentParser(
        prog="blockcopy", description="Live block copy of running QEMU VM disks, with a crash-safe pivot.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_global_options(suppress=False)])
    parser.add_argument("--version", action="version", version=f"blockcopy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("attach", parents=[common], help="register a running QEMU by its QMP socket")
    p.add_argument("domain")
    p.add_argument("--qmp", required=True, metavar="SOCKET", help="QMP unix socket reserved for blockcopy")
    p = sub.add_parser("detach", parents=[common], help="forget a domain (it must have no unfinished job)")
    p.add_argument("domain")
    sub.add_parser("domains", parents=[common], help="list attached domains")
    p = sub.add_parser("disks", parents=[common], help="list a domain's disks")
    p.add_argument("domain")

    p = sub.add_parser("copy", parents=[common], help="start a live copy of one or more disks",
                       description="Mirror disks of a running domain to new images. All disks of one "
                       "copy pivot together.")
    p.add_argument("domain")
    p.add_argument("pair", nargs="*", metavar="DISK DEST", help="one disk and its destination "
                   "(or use --disk)")
    p.add_argument("--disk", action="append", type=_disk_pair, default=[], metavar="DISK=DEST",
                   help="disk (qdev id, drive id or node name) and absolute destination path; repeatable")
    p.add_argument("--format", choices=FORMATS, help="destination format (default: the source's)")
    p.add_argument("--shallow", action="store_true",
                   help="copy only the top image; the destination gets the source's backing file")
    p.add_argument("--reuse-external", action="store_true",
                   help="DEST exists already (same format and virtual size) and is used as is")
    p.add_argument("--bandwidth", type=_positive_float, metavar="MiB/s", help="copy speed limit")
    p.add_argument("--buf-size", type=_size, metavar="SIZE",
                   help=f"mirror buffer, the data in flight per disk (default {DEFAULT_BUF_SIZE // (1 << 20)}M, or "
                   "one second of --bandwidth when that is less, at least 1M). Larger copies faster and stalls "
                   "the guest longer while copying (README: Benchmarks)")
    p.add_argument("--dest-option", action="append", default=[], metavar="KEY=VALUE",
                   help="set a node option of DEST instead of the source's (cache.direct, cache.no-flush, aio, "
                   "discard, detect-zeroes, locking); repeatable. By default DEST gets the "
                   "source's options that QEMU reports or its command line shows")
    p.add_argument("--owner", type=_owner, metavar="USER[:GROUP]",
                   help="owner of a DEST that blockcopy creates (default: the source file's)")
    p.add_argument("--file-mode", type=_octal_mode, metavar="MODE",
                   help="permission bits of a DEST that blockcopy creates, e.g. 0660 (default: the source file's)")
    p.add_argument("--cluster-size", type=_size, metavar="SIZE",
                   help="cluster size of a created qcow2 DEST (default: the source's)")
    p.add_argument("--preallocation", choices=PREALLOCATIONS,
                   help="preallocation of a created DEST (default off: sparse)")
    p.add_argument("--mode", choices=MODES, default="write-blocking",
                   help="write-blocking (default): guest writes reach both images once ready, so the "
                   "copy always converges; background: faster guest writes, may never converge")
    end = p.add_mutually_exclusive_group()
    end.add_argument("--wait", action="store_true", help="wait until the copy is ready (progress bar)")
    end.add_argument("--pivot", action="store_true", help="wait, then switch the guest to DEST")
    end.add_argument("--finish", action="store_true",
                     help="wait, then end the mirror: DEST is a consistent copy, the guest stays on the source")

    p = sub.add_parser("jobs", parents=[common], help="list jobs")
    p.add_argument("--domain")
    p = sub.add_parser("status", parents=[common], help="show one job")
    p.add_argument("job")
    p.add_argument("--log", action="store_true", help="also print the journaled steps")
    for name, text in (("pivot", "switch the guest to the destination (all disks together)"),
                       ("finish", "end the mirror leaving a consistent copy; the guest stays on the source")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("job")
        p.add_argument("--wait", action="store_true", help="wait for the copy to be ready first")
    p = sub.add_parser("abort", parents=[common], help="cancel a job; the guest stays on the source")
    p.add_argument("job")
    p = sub.add_parser("recover", parents=[common],
                       help="reconcile every unfinished job with QEMU and carry out journaled pivots")
    p.add_argument("--domain")
    p.add_argument("--no-wait", action="store_true",
                   help="do not wait for copies that are not ready yet")
    p = sub.add_parser("demo", parents=[common], help="self-contained run of the main job in a scratch VM")
    p.add_argument("--size", type=int, default=256, metavar="MiB", help="disk size (default 256)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return parser


class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def emit(self, data: Any, text: str) -> None:
        if self.as_json:
            print(json.dumps(data, indent=2, sort_keys=True))
        else:
            print(text)


async def run_command(args: argparse.Namespace, manager: Manager, out: Output) -> int:
    cmd = args.command
    show_progress = not args.json and sys.stderr.isatty()
    if cmd == "attach":
        domain = await manager.attach(args.domain, args.qmp)
        process = f" (QEMU pid {domain.qemu_pid})" if domain.qemu_pid else ""
        out.emit(views.domain_view(domain), f"attached {domain.name} at {domain.qmp_socket}{process}")
    elif cmd == "detach":
        manager.detach(args.domain)
        out.emit({"domain": args.domain, "detached": True}, f"detached {args.domain}")
    elif cmd == "domains":
        domains = manager.domains()
        out.emit([views.domain_view(d) for d in domains],
                 "\n".join(f"{d.name}\t{d.qmp_socket}" for d in domains) or "no domains attached")
    elif cmd == "disks":
        devices = await manager.disks(args.domain)
        rows = [f"{d.name}\tnode {d.node}\t{d.format}\t{d.virtual_size} bytes\t{d.file}"
                + "".join(f"\n\tbacking {b}" for b in d.backing_chain) for d in devices]
        out.emit([views.device_view(d) for d in devices], "\n".join(rows) or "no disks")
    elif cmd == "copy":
        return await _copy(args, manager, out, show_progress)
    elif cmd == "jobs":
        ops = await manager.jobs(args.domain)
        out.emit([views.operation_view(op) for op in ops],
                 "\n".join(f"{op.id}\t{op.domain}\t{views.state(op)}\t"
                           f"{op.outcome.value if op.outcome else '-'}\t"
                           f"{','.join(d.name for d in op.disks)}" for op in ops) or "no jobs")
    elif cmd == "status":
        op = await manager.status(args.job)
        data = views.operation_view(op)
        text = describe(op)
        if args.log:
            steps = manager.history(op.id)
            data["log"] = [{"at": at, "phase": phase, "note": note} for at, phase, note in steps]
            text += "\n" + "\n".join(f"  {time.strftime('%H:%M:%S', time.localtime(at))}"
                                     f".{int(at % 1 * 1000):03d} [{phase}] {note}" for at, phase, note in steps)
        out.emit(data, text)
    elif cmd in ("pivot", "finish"):
        with progress_display(show_progress and args.wait) as progress:
            method = manager.pivot if cmd == "pivot" else manager.finish
            op = await method(args.job, wait=args.wait, on_progress=progress)
        return _result(op, out)
    elif cmd == "abort":
        return _result(await manager.abort(args.job), out)
    elif cmd == "recover":
        with progress_display(show_progress) as progress:
            ops = await manager.recover(args.domain, wait=not args.no_wait, on_progress=progress)
        out.emit([views.operation_view(op) for op in ops],
                 "\n\n".join(describe(op) for op in ops) or "nothing to recover")
        return 7 if any(op.outcome is Outcome.FAILED for op in ops) else 0
    return 0


async def _copy(args: argparse.Namespace, manager: Manager, out: Output, show_progress: bool) -> int:
    targets = list(args.disk)
    if args.pair:
        if len(args.pair) != 2:
            raise UsageError("give one DISK DEST pair, or any number of --disk DISK=DEST")
        targets.append((args.pair[0], args.pair[1]))
    goal = Goal.PIVOT if args.pivot else Goal.FINISH if args.finish else Goal.COPY
    until = Until.READY if args.wait else Until.STARTED
    try:
        dest_options = dict(nodes.parse_dest_option(text) for text in args.dest_option)
    except nodes.NodeTreeError as exc:
        raise UsageError(str(exc)) from None
    request = CopyRequest(domain=args.domain, targets=targets, format=args.format, shallow=args.shallow,
                          reuse_external=args.reuse_external, bandwidth_mib=args.bandwidth,
                          mode=args.mode, goal=goal, buf_size=args.buf_size, dest_options=dest_options,
                          owner=args.owner, mode_bits=args.file_mode, cluster_size=args.cluster_size,
                          preallocation=args.preallocation)
    waits = args.wait or args.pivot or args.finish
    with progress_display(show_progress and waits) as progress:
        op = await manager.copy(request, until=until, on_progress=progress)
    if not waits and op.outcome is None:
        out.emit(views.operation_view(op), f"started job {op.id}\n" + describe(op))
        return 0
    return _result(op, out)


def _result(op: Operation, out: Output) -> int:
    out.emit(views.operation_view(op), describe(op))
    return 7 if op.outcome is Outcome.FAILED else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="blockcopy: %(name)s: %(message)s")
    if not args.verbose:
        # qemu.qmp logs connection failures itself; blockcopy turns them into one clear error.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    if args.command == "demo":
        from blockcopy.demo import run_demo

        return run_demo(args.size, as_json=args.json, keep=args.keep)
    return _run(lambda manager: run_command(args, manager, Output(args.json)), args.state_dir,
                create_journal=args.command == "attach", command_timeout=args.qmp_timeout,
                transition_timeout=args.transition_timeout)


def _run(body: Callable[[Manager], Awaitable[int]], state_dir: str | None, *, create_journal: bool,
         command_timeout: float, transition_timeout: float) -> int:
    async def runner() -> int:
        manager = Manager(state_dir, create_journal=create_journal, command_timeout=command_timeout,
                          transition_timeout=transition_timeout)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, manager.interrupt.set)
        try:
            return await body(manager)
        finally:
            manager.close()

    try:
        return asyncio.run(runner())
    except Interrupted as exc:
        print(f"blockcopy: {exc}. `blockcopy status` shows it; `blockcopy pivot`, `finish` or `abort` "
              "ends it.", file=sys.stderr)
        return exc.exit_code
    except BlockcopyError as exc:
        print(f"blockcopy: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
