"""The ``blockcopy`` command: a thin shell over :class:`blockcopy.manager.Manager`.

Text output is for people; ``--json`` output is for programs (fields in :mod:`blockcopy.views`).
Errors go to stderr with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable, Coroutine

from blockcopy import __version__
from blockcopy.defaults import COMMAND_TIMEOUT, DEFAULT_BUF_SIZE, FORMATS, MODES, PREALLOCATIONS, TRANSITION_TIMEOUT
from blockcopy.errors import BlockcopyError, Interrupted, UsageError
from blockcopy.ui import describe_view, progress_display

TYPE_CHECKING = False  # (typing.TYPE_CHECKING, without loading typing: see blockcopy/__init__.py)
if TYPE_CHECKING:
    from typing import Any

# The core (asyncio, QMP, SQLite, the records' dataclasses: most of a command's start) is loaded
# only by the commands that run in this process (``_embedded``); through the daemon only the small
# client over the socket module is (``bench/startup.py``; test_service checks what is loaded).

#: ``Outcome.FAILED``'s value (:mod:`blockcopy.records` is not loaded through the daemon).
FAILED = "failed"

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


def _speed(text: str) -> float:
    """MiB/s, 0 for no limit."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MiB/s") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"give a number of MiB/s, 0 for no limit, not {text}")
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
    common.add_argument("--socket", default=default(None), metavar="PATH",
                        help="the daemon's API socket (env BLOCKCOPY_SOCKET; default STATE_DIR/run/blockcopy.sock). "
                        "When a daemon listens there, commands go through it")
    common.add_argument("--no-daemon", action="store_true", default=default(False),
                        help="run the command in this process even when a daemon runs (env BLOCKCOPY_NO_DAEMON=1); "
                        "it is refused on domains the daemon holds")
    common.add_argument("--qmp-timeout", type=_positive_float_seconds,
                        default=default(COMMAND_TIMEOUT),
                        metavar="SECONDS", help="how long QEMU may take to answer one QMP command before "
                        f"blockcopy drops the connection and asks again (default {COMMAND_TIMEOUT:g})")
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
    p.add_argument("--page-cache-fill", action="store_true",
                   help="fill a DEST that is to be O_DIRECT (cache.direct=on, as libvirt's cache='none') through "
                   "the host's page cache, written out while the copy runs, and reopen it O_DIRECT once ready "
                   "(--pivot, --finish). It was faster on storage where O_DIRECT writes of the mirror's chunks were "
                   "slow; it uses the host's page cache, and on faster storage it stalled guest writes longer "
                   "while copying (README: Benchmarks). "
                   "Default: DEST is O_DIRECT from the start, as the source")
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
    p.add_argument("--request-id", metavar="ID",
                   help="idempotency key: running the same copy again with the same id returns the job it "
                   "started instead of starting another (for scripts that retry); another copy with that id "
                   "is refused")
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
    p = sub.add_parser("speed", parents=[common], help="change a copying job's speed limit (journaled)")
    p.add_argument("job")
    p.add_argument("bandwidth", type=_speed, metavar="MiB/s", help="the new limit; 0 removes it")
    p = sub.add_parser("recover", parents=[common],
                       help="reconcile every unfinished job with QEMU and carry out journaled pivots")
    p.add_argument("--domain")
    p.add_argument("--no-wait", action="store_true",
                   help="do not wait for copies that are not ready yet")
    p = sub.add_parser("serve", parents=[common], help="run the daemon: one process owns the QMP connections and "
                       "serves an HTTP API on a unix socket (README: Service)")
    p.add_argument("--allow-user", action="append", default=[], metavar="USER",
                   help="a user that may use the API socket besides root and the daemon's own; repeatable")
    p.add_argument("--allow-group", action="append", default=[], metavar="GROUP",
                   help="a group whose members may use the API socket; repeatable")
    p.add_argument("--group", metavar="GROUP", help="group owner of the API socket (mode 0660)")
    p.add_argument("--listen", metavar="HOST:PORT", help="also listen on TCP, with TLS and a bearer token only")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate (chain) of the TCP listener")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key of the TCP listener")
    p.add_argument("--token-file", metavar="FILE", help="file holding the bearer token TCP clients must send")
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


async def run_command(args: argparse.Namespace, backend: Any, out: Output) -> int:
    """One command on ``backend`` (:class:`blockcopy.embedded.EmbeddedBackend` or the daemon's
    :class:`blockcopy.service.client.RemoteBackend`): the same output and exit status either way."""
    cmd = args.command
    show_progress = not args.json and sys.stderr.isatty()
    if cmd == "attach":
        domain = await backend.attach(args.domain, args.qmp)
        process = f" (QEMU pid {domain['qemu_pid']})" if domain["qemu_pid"] else ""
        out.emit(domain, f"attached {domain['domain']} at {domain['qmp_socket']}{process}")
    elif cmd == "detach":
        await backend.detach(args.domain)
        out.emit({"domain": args.domain, "detached": True}, f"detached {args.domain}")
    elif cmd == "domains":
        domains = await backend.domains()
        out.emit(domains, "\n".join(f"{d['domain']}\t{d['qmp_socket']}" for d in domains) or "no domains attached")
    elif cmd == "disks":
        devices = await backend.disks(args.domain)
        rows = [f"{d['disk']}\tnode {d['node']}\t{d['format']}\t{d['virtual_size']} bytes\t{d['image']}"
                + "".join(f"\n\tbacking {b}" for b in d["backing_chain"]) for d in devices]
        out.emit(devices, "\n".join(rows) or "no disks")
    elif cmd == "copy":
        return await _copy(args, backend, out, show_progress)
    elif cmd == "jobs":
        jobs = await backend.jobs(args.domain)
        out.emit(jobs, "\n".join(f"{j['id']}\t{j['domain']}\t{j['state']}\t{j['outcome'] or '-'}\t"
                                 f"{','.join(d['disk'] for d in j['disks'])}" for j in jobs) or "no jobs")
    elif cmd == "status":
        data = await backend.status(args.job, args.log)
        text = describe_view(data)
        if args.log:
            text += "\n" + "\n".join(f"  {time.strftime('%H:%M:%S', time.localtime(s['at']))}"
                                     f".{int(s['at'] % 1 * 1000):03d} [{s['phase']}] {s['note']}" for s in data["log"])
        out.emit(data, text)
    elif cmd in ("pivot", "finish"):
        with progress_display(show_progress and args.wait) as progress:
            view = await backend.conclude(args.job, cmd, args.wait, progress)
        return _result(view, out)
    elif cmd == "abort":
        return _result(await backend.conclude(args.job, "abort", True, None), out)
    elif cmd == "speed":
        view = await backend.speed(args.job, args.bandwidth)
        limit = f"{args.bandwidth:g} MiB/s" if args.bandwidth else "unlimited"
        out.emit(view, f"job {view['id']}: speed {limit}\n" + describe_view(view))
    elif cmd == "recover":
        with progress_display(show_progress) as progress:
            jobs = await backend.recover(args.domain, not args.no_wait, progress)
        out.emit(jobs, "\n\n".join(describe_view(j) for j in jobs) or "nothing to recover")
        return 7 if any(j["outcome"] == FAILED for j in jobs) else 0
    return 0


async def _copy(args: argparse.Namespace, backend: Any, out: Output, show_progress: bool) -> int:
    targets = list(args.disk)
    if args.pair:
        if len(args.pair) != 2:
            raise UsageError("give one DISK DEST pair, or any number of --disk DISK=DEST")
        targets.append((args.pair[0], args.pair[1]))
    # CopyRequest's fields, with the goal's value and --dest-option's texts: each backend checks
    # them the same way (the embedded one builds the CopyRequest, the daemon its API's request).
    request = {"domain": args.domain, "targets": targets, "format": args.format, "shallow": args.shallow,
               "reuse_external": args.reuse_external, "bandwidth_mib": args.bandwidth, "mode": args.mode,
               "goal": "pivot" if args.pivot else "finish" if args.finish else "copy", "buf_size": args.buf_size,
               "dest_options": _last_per_key(args.dest_option), "owner": args.owner, "mode_bits": args.file_mode,
               "cluster_size": args.cluster_size, "preallocation": args.preallocation,
               "page_cache_fill": args.page_cache_fill, "client_key": args.request_id}
    waits = args.wait or args.pivot or args.finish
    wait_until = "done" if args.pivot or args.finish else "ready" if args.wait else "started"
    with progress_display(show_progress and waits) as progress:
        view = await backend.copy(request, wait_until, progress)
    if not waits and view["outcome"] is None:
        out.emit(view, f"started job {view['id']}\n" + describe_view(view))
        return 0
    return _result(view, out)


def _last_per_key(texts: list[str]) -> list[str]:
    """``--dest-option`` texts without repeats (the last of equal texts kept, so that the options'
    dict, which keeps a key's last value, comes out the same): every distinct text is still checked."""
    return list(reversed(dict.fromkeys(reversed(texts))))


def _result(view: dict[str, Any], out: Output) -> int:
    out.emit(view, describe_view(view))
    return 7 if view["outcome"] == FAILED else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose or args.command in ("demo", "serve"):
        _log_to_stderr(args.verbose)
    if args.command == "demo":
        from blockcopy.demo import run_demo

        return run_demo(args.size, as_json=args.json, keep=args.keep)
    if args.command == "serve":
        return _serve(args)
    out = Output(args.json)
    for name in ("job", "domain"):
        if getattr(args, name, None) == "":
            print(f"blockcopy: error: give a {name} name, not an empty one", file=sys.stderr)
            return UsageError.exit_code
    try:
        remote = None if args.no_daemon else _daemon(args.state_dir, args.socket)
    except BlockcopyError as exc:
        print(f"blockcopy: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if remote is not None:
        return _run(lambda: _through_daemon(args, remote, out), loop=False)
    _log_to_stderr(args.verbose)
    return _run(lambda: _embedded(args, out))


def _log_to_stderr(verbose: bool) -> None:
    import logging

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="blockcopy: %(name)s: %(message)s")
    if not verbose:
        # qemu.qmp logs connection failures itself; blockcopy turns them into one clear error.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


async def _through_daemon(args: argparse.Namespace, backend: Any, out: Output) -> int:
    # The daemon's client blocks in reads: Ctrl-C must interrupt one (KeyboardInterrupt), not wait
    # to cancel a task that is never scheduled meanwhile.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return await run_command(args, backend, out)


async def _embedded(args: argparse.Namespace, out: Output) -> int:
    import asyncio

    from blockcopy.embedded import EmbeddedBackend
    from blockcopy.manager import Manager

    manager = Manager(args.state_dir, create_journal=args.command == "attach", command_timeout=args.qmp_timeout,
                      transition_timeout=args.transition_timeout)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, manager.interrupt.set)
    try:
        return await run_command(args, EmbeddedBackend(manager), out)
    finally:
        manager.close()


def _daemon(state_dir: str | None, socket_path: str | None) -> Any:
    """The daemon's backend when a daemon serves this state directory, else None."""
    from blockcopy.defaults import default_state_path
    from blockcopy.service.client import DaemonClient, RemoteBackend, default_socket

    client = DaemonClient.find(socket_path or default_socket(state_dir or default_state_path()))
    return RemoteBackend(client) if client is not None else None


def _serve(args: argparse.Namespace) -> int:
    try:
        from blockcopy.service import server
    except ImportError as exc:
        print(f"blockcopy: error: the daemon needs its libraries ({exc.name}); install blockcopy with pip "
              "(they are dependencies)", file=sys.stderr)
        return 1
    try:
        access = server.Access(uids=server.parse_ids(args.allow_user, groups=False),
                               gids=server.parse_ids(args.allow_group, groups=True))
        group = next(iter(server.parse_ids([args.group], groups=True))) if args.group else None
    except BlockcopyError as exc:
        print(f"blockcopy: error: {exc}", file=sys.stderr)
        return exc.exit_code
    options = server.ServeOptions(
        state_dir=args.state_dir, socket_path=args.socket, access=access, socket_group=group, listen=args.listen,
        tls_cert=args.tls_cert, tls_key=args.tls_key, token_file=args.token_file,
        daemon_options={"command_timeout": args.qmp_timeout, "transition_timeout": args.transition_timeout})
    import logging

    return server.run(options, log_level=logging.INFO if args.verbose else logging.WARNING)


def _run(command: Callable[[], Coroutine[Any, Any, int]], *, loop: bool = True) -> int:
    """Run a command's coroutine; errors become a message and the CLI's exit status. ``loop=False``:
    a coroutine that never suspends (the daemon's client blocks instead) runs without asyncio."""
    try:
        if loop:
            import asyncio

            return asyncio.run(command())
        return _to_the_end(command())
    except Interrupted as exc:
        print(f"blockcopy: {exc}. `blockcopy status` shows it; `blockcopy pivot`, `finish` or `abort` "
              "ends it.", file=sys.stderr)
        return exc.exit_code
    except BlockcopyError as exc:
        print(f"blockcopy: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("blockcopy: interrupted; the daemon goes on. `blockcopy jobs` shows the jobs", file=sys.stderr)
        return Interrupted.exit_code


def _to_the_end(coroutine: Coroutine[Any, Any, int]) -> int:
    """The result of a coroutine that never suspends, without an event loop (importing asyncio
    alone takes 60-80 ms on the test machine, more than the rest of the command through the daemon)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return int(done.value)
    coroutine.close()
    raise RuntimeError("the daemon's client waited on an event loop; it must only block")


if __name__ == "__main__":
    sys.exit(main())
