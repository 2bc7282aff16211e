"""A device's block node tree, read from QEMU's answers, and the DEST nodes that keep it intact.

Pure translation, no I/O, except the two small probes at the bottom (``probe_o_direct``,
``qemu_argv``), which the caller runs before touching anything.

Theory of operation
-------------------
A disk is a BlockBackend (the device's ``qdev`` path, or a ``-drive`` id) whose *root* node may be a
chain of filters above the image::

    BlockBackend -> [throttle -> copy-on-read ...] -> format (qcow2/raw) -> [preallocate] -> protocol (file)
                    \\__ filters, kept as they are __/                       \\_ re-created on DEST _/

:func:`node_tree` walks that chain from ``query-block``'s ``inserted.node-name`` through the edges of
``x-debug-query-block-graph`` (the only QEMU 7.2 answer that names a node's children) and reads each
node's options from ``query-named-block-nodes`` (``flat: true``). :func:`dest_blockdev_args` builds the
``blockdev-add`` of DEST's format (+ protocol filters) + protocol nodes with the source's options, and
:func:`mirror_target_args` the ``device``/``replaces`` pair that swaps only the image at the pivot.

What QEMU 7.2 reports, and where (established by experiment on 7.2.22, see tests/test_nodes.py)
-----------------------------------------------------------------------------------------------
- ``cache.direct``, ``cache.no-flush``: per node, ``query-named-block-nodes`` ``cache`` (and
  ``query-block`` ``inserted.cache`` for the root). ``cache.writeback`` there is the BlockBackend's
  write cache (a device property, ``write-cache``), not a node option: not carried, it stays with the
  device.
- ``detect-zeroes``: per node, ``detect_zeroes``. ``-drive detect-zeroes=`` sets it on the top node
  only.
- ``read-only``: per node, ``ro``. DEST is never *added* read-only (the mirror writes to it); QEMU's
  mirror reopens the target read-only at completion when the source was (observed: the DEST of a
  ``read-only=on`` disk and of a CD-ROM reports ``ro: true`` after the pivot).
- throttle filter: ``drv: throttle`` and its group only inside the ``json:`` filename
  (``{"throttle-group": "tg0", ...}``); the group's limits are the QOM object's ``limits`` property.
  query-block of a throttle-rooted device shows ``drv: throttle``, a ``json:`` ``file`` and the image
  below it as ``image.backing-image`` (``backing_file_depth: 1``): do not read those as the image.
- BlockBackend throttling (``block_set_io_throttle``, ``-drive throttling.*``): ``query-block``
  ``inserted.bps``... ``iops_wr``, ``*_max``, ``group``. It lives on the BlockBackend and survives a
  pivot by itself (observed for virtio-blk, ide-hd and ``-drive``); nothing to carry.
- NOT reported anywhere in QMP (not in ``query-named-block-nodes``, ``query-block``, the ``json:``
  filename of file nodes, nor ``x-debug-query-block-graph``): ``aio``, ``discard``, ``locking``,
  ``auto-read-only``, qcow2's runtime options (``pass-discard-*``, cache sizes), ``copy-on-read``'s
  ``bottom``, ``preallocate``'s sizes. What we do about each:

  - ``discard``: inferred ``unmap`` when the same node has ``detect-zeroes: unmap`` (QEMU refuses
    that combination otherwise: "setting detect-zeroes to unmap is not allowed without setting
    discard operation to unmap"). Otherwise taken from the command line (below) or left unknown:
    DEST then gets QEMU's default ``ignore`` (data safe; the guest's discards stop freeing space).
  - ``aio``: ``native`` needs ``cache.direct=on`` (QEMU: "aio=native was specified, but it requires
    cache.direct=on"), so ``cache.direct=off`` means "threads or io_uring", never native. The value
    itself comes only from the command line or is unknown: DEST then gets QEMU's default ``threads``,
    which opens on any storage (native is a performance class, not a correctness property).
    ``cache.direct=on`` is *not* a hint for ``native``: libvirt 9.0 runs ``cache=none`` disks with
    ``aio`` threads.
  - ``locking``: from the command line or unknown -> QEMU's default (``auto``, i.e. on where OFD locks
    exist), the safe side.
  - ``auto-read-only``: from the command line or unknown -> not set.

  "Unknown" is never silent: :attr:`NodeTree.unknown` lists them and :func:`unknown_option_warnings`
  words them for an operator; ``overrides`` (a ``--dest-option``) sets any of them explicitly.
- The command line of a local QEMU is the one place where ``aio``/``discard``/``locking`` of nodes
  defined at start-up can be read: :func:`qemu_argv` (its pid from ``SO_PEERCRED`` of the QMP socket,
  then ``/proc/PID/cmdline``) and :func:`options_from_argv` (``-blockdev`` in keyval and JSON forms,
  ``-drive``). Nodes added later with ``blockdev-add`` (hot-plug, an earlier blockcopy pivot) are not
  there: their options are whatever added them (blockcopy's own journal for its DEST nodes).

The pivot with filters (``blockdev-mirror`` on QEMU 7.2)
--------------------------------------------------------
- ``device`` must be a *root* node: mirroring the format node below a throttle filter is refused
  ("Need a root block node"). So ``device`` is the BlockBackend's root (the top filter).
- Without ``replaces``, completion swaps the root itself: the device ends on DEST *without* the filter
  (the throttle group silently stops applying). With ``replaces`` = the format node below the filters,
  completion swaps only that node: the filter's child becomes DEST and the device still uses the
  filter (observed: ``t0 -file-> DEST``, device root ``t0``).
- The mirror reads the source *through* the filters: with a throttle group of 4 MiB/s a 64 MiB copy
  took 15.8 s, and the copy's reads use the same budget as the guest. The copy rate of a throttled
  disk is bounded by its own limits.
- BlockBackend-level throttling needs nothing: it stays on the BlockBackend.
- The target is moved to the source's AioContext (a disk on an iothread) by ``blockdev-mirror`` itself.
- A shallow copy works the same way: ``sync: top`` with ``device`` = the throttle root and ``replaces``
  = the format node copies the top layer only, and DEST (added with ``backing`` = the source's
  backing node, :attr:`NodeTree.backing`) ends as ``throttle -> DEST -> backing``.
- A read-only source: QEMU reopens DEST read-only at completion, *by path*, as the QEMU user (a new
  O_RDONLY descriptor). If that open fails (a ``-runas`` QEMU that cannot open DEST by path any
  more) the pivot still succeeds and DEST silently stays read-write: check ``ro`` afterwards.

QEMU running as another user (``-runas``)
------------------------------------------
Every node blockcopy adds is opened by QEMU after it dropped privileges: DEST's file (``blockdev-add``),
DEST's backing file if QEMU opens it from the image header (not when ``backing`` names a node), and
DEST again at completion for a read-only disk. A root-owned 0600 DEST fails ``blockdev-add`` with
"Permission denied"; DEST must be owned (or readable/writable) by QEMU's user, with every directory
above it searchable. The old source stays open through QEMU's descriptors until ``blockdev-del``.

O_DIRECT on DEST's storage
--------------------------
``cache.direct=on`` (and so ``aio=native``) opens with O_DIRECT; a file system without it fails the
``blockdev-add`` with EINVAL. :func:`probe_o_direct` checks DEST's directory (or block device) first;
:func:`o_direct_refusal` turns the answer into a refusal message. On Linux >= 6.6 tmpfs accepts
O_DIRECT; ramfs does not (both observed on 6.18).
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import socket
import stat
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from blockcopy.errors import UsageError

#: Filter drivers that may sit between the BlockBackend and the image; the pivot keeps them.
FILTER_DRIVERS = frozenset({"throttle", "copy-on-read", "compress", "blklogwrites", "blkdebug", "blkverify",
                            "preallocate"})
#: Filters that only a running block job inserts: a device under one is busy with another job.
JOB_FILTER_DRIVERS = frozenset({"mirror_top", "commit_top", "copy-before-write", "backup-top", "cbw"})
#: Drivers that are a host file or device (the bottom of the image).
PROTOCOL_DRIVERS = frozenset({"file", "host_device", "host_cdrom"})
#: The options carried to DEST, in blockdev-add spelling (dotted for nested keys).
CARRIED_OPTIONS = ("cache.direct", "cache.no-flush", "aio", "discard", "detect-zeroes", "locking", "auto-read-only")
#: Which of them a format node accepts (aio and locking are file-posix options).
FORMAT_NODE_OPTIONS = ("cache.direct", "cache.no-flush", "discard", "detect-zeroes", "auto-read-only")
#: Options QMP never reports: read from the command line, inferred, or unknown.
UNREPORTED = ("aio", "discard", "locking", "auto-read-only")

AIO_VALUES = frozenset({"threads", "native", "io_uring"})
DISCARD_VALUES = {"ignore": "ignore", "off": "ignore", "unmap": "unmap", "on": "unmap"}
DETECT_ZEROES_VALUES = frozenset({"off", "on", "unmap"})
LOCKING_VALUES = frozenset({"on", "off", "auto"})


class NodeTreeError(ValueError):
    """The answers do not describe a disk whose image blockcopy can replace (the message says why)."""


@dataclass(frozen=True)
class NodeInfo:
    """One node: its name, driver, filename as QEMU reports it, and the options known for it.

    ``options`` holds blockdev-add spellings (``cache.direct``, ``aio``, ``discard``, ...) with the
    values read from QEMU, inferred, or taken from the command line; ``unknown`` the carried options
    whose value could not be found.
    """

    name: str
    driver: str
    filename: str
    read_only: bool
    options: Mapping[str, Any] = field(default_factory=dict)
    unknown: frozenset[str] = frozenset()


@dataclass(frozen=True)
class FilterInfo:
    """A filter node: kept in place by the pivot (above the image) or re-created on DEST (below it)."""

    name: str
    driver: str
    options: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"throttle-group": "tg0"}


@dataclass(frozen=True)
class NodeTree:
    """A device's nodes, top to bottom: root, filters, format, protocol filters, protocol."""

    device_key: str  # query-block's qdev (or the -drive id when there is no device)
    drive_id: str | None  # query-block's "device" (a -drive id), None for -blockdev disks
    root: str  # the BlockBackend's root node: the mirror's ``device``
    filters: tuple[FilterInfo, ...]  # above the format node, top first (empty: the root is the image)
    format: NodeInfo | None  # None when the device sits directly on a protocol node
    protocol_filters: tuple[FilterInfo, ...]  # between format and protocol, top first (preallocate)
    protocol: NodeInfo
    backing: str | None  # the format node's backing node name
    virtual_size: int
    cluster_size: int | None
    read_only: bool  # the image as the device opens it
    backend_throttle: Mapping[str, Any] = field(default_factory=dict)  # block_set_io_throttle limits
    #: the backing chain's nodes, top first, each layer's format node then the nodes below it
    backing_chain_nodes: tuple[str, ...] = ()

    @property
    def image(self) -> NodeInfo:
        """The node the pivot replaces: the format node, or the protocol node when there is none."""
        return self.format or self.protocol

    @property
    def image_filename(self) -> str:
        return self.protocol.filename

    @property
    def image_format(self) -> str:
        return self.format.driver if self.format else "raw"

    @property
    def unknown(self) -> dict[str, frozenset[str]]:
        """Carried options whose value QEMU did not tell, by node role ("format", "protocol")."""
        out = {"protocol": self.protocol.unknown}
        if self.format is not None:
            out["format"] = self.format.unknown
        return {role: names for role, names in out.items() if names}

    def carried_options(self) -> dict[str, dict[str, Any]]:
        """The options DEST gets, by node role."""
        out = {"protocol": dict(self.protocol.options)}
        if self.format is not None:
            out["format"] = dict(self.format.options)
        return out

    def nodes_below_image(self, *, with_backing_chain: bool) -> tuple[str, ...]:
        """The nodes a pivot leaves unused below the image it swaps out, in the order they can be
        deleted (each freed by the one before): its protocol filters and protocol node, then, for a
        full copy (DEST has no backing), the old backing chain."""
        if self.format is None:
            return ()
        own = (*(f.name for f in self.protocol_filters), self.protocol.name)
        return (*own, *self.backing_chain_nodes) if with_backing_chain else own


@dataclass(frozen=True)
class ArgvOptions:
    """Node options written on a QEMU command line: by node name (-blockdev) and by drive id (-drive).

    ``drives`` maps a drive id to ``{"format": {...}, "protocol": {...}}`` since ``-drive`` nodes get
    generated names.
    """

    nodes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    drives: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)
    #: ids of ``-drive``s with ``copy-on-read=on`` (a node flag, no filter node: QMP does not show it)
    copy_on_read: frozenset[str] = frozenset()


# --- reading the tree ---------------------------------------------------------------------------

def node_tree(block_entry: Mapping[str, Any], named_nodes: Iterable[Mapping[str, Any]],
              graph: Mapping[str, Any] | None = None, *, argv: ArgvOptions | None = None) -> NodeTree:
    """Describe one device's node tree.

    ``block_entry``: the device's entry of ``query-block``; ``named_nodes``: ``query-named-block-nodes``
    with ``flat: true``; ``graph``: ``x-debug-query-block-graph`` (needed whenever the root is not
    the image itself or more than one node could be its protocol node); ``argv``: options from the
    command line (:func:`options_from_argv`), for what QMP does not report.
    """
    inserted = block_entry.get("inserted")
    if not inserted:
        raise NodeTreeError("the drive has no medium (an empty CD-ROM drive?)")
    nodes = {str(n["node-name"]): n for n in named_nodes if n.get("node-name")}
    root = str(inserted["node-name"])
    if root not in nodes:
        raise NodeTreeError(f"node {root} is not in query-named-block-nodes")
    children = _children(graph) if graph is not None else None
    drive_id = str(block_entry.get("device") or "") or None
    device_key = str(block_entry.get("qdev") or drive_id or "")
    argv = argv or ArgvOptions()

    def child(name: str, role: str) -> str | None:
        if children is not None:
            return children.get(name, {}).get(role)
        return _guess_child(nodes, name, role)

    filters: list[FilterInfo] = []
    current = root
    while _driver(nodes[current]) in FILTER_DRIVERS or _driver(nodes[current]) in JOB_FILTER_DRIVERS:
        drv = _driver(nodes[current])
        if drv in JOB_FILTER_DRIVERS:
            raise NodeTreeError(f"node {current} is a {drv} node: a block job is already running on this disk")
        if children is None:
            raise NodeTreeError(f"the disk's root node {current} is a {drv} filter: its children can only be "
                                "read from x-debug-query-block-graph; pass it")
        filters.append(FilterInfo(current, drv, _filter_options(nodes[current])))
        below = child(current, "file") or child(current, "backing")
        if below is None or below not in nodes:
            raise NodeTreeError(f"filter node {current} ({drv}) has no named child")
        current = below

    fmt_raw = nodes[current]
    fmt: NodeInfo | None = None
    protocol_filters: list[FilterInfo] = []
    if _driver(fmt_raw) in PROTOCOL_DRIVERS:
        proto_name = current
    else:
        fmt_hint = _argv_for(argv, current, drive_id, "format")
        fmt = _node_info(fmt_raw, fmt_hint, role="format", on_cmdline=_on_cmdline(argv, current, drive_id))
        below = child(current, "file")
        if below is None or below not in nodes:
            raise NodeTreeError(f"format node {current} ({fmt.driver}) has no named file child")
        while _driver(nodes[below]) in FILTER_DRIVERS:
            protocol_filters.append(FilterInfo(below, _driver(nodes[below]), _filter_options(nodes[below])))
            nxt = child(below, "file")
            if nxt is None or nxt not in nodes:
                raise NodeTreeError(f"filter node {below} has no named file child")
            below = nxt
        proto_name = below
    proto_raw = nodes[proto_name]
    if _driver(proto_raw) not in PROTOCOL_DRIVERS:
        raise NodeTreeError(f"the image's bottom node {proto_name} uses driver {_driver(proto_raw)}; blockcopy "
                            f"replaces images on {', '.join(sorted(PROTOCOL_DRIVERS))} nodes only")
    proto = _node_info(proto_raw, _argv_for(argv, proto_name, drive_id, "protocol"), role="protocol",
                       on_cmdline=_on_cmdline(argv, proto_name, drive_id))
    image_node = nodes[current] if fmt is not None else proto_raw
    image = image_node.get("image") or {}
    chain: list[str] = []
    layer = child(current, "backing") if fmt is not None else None
    while layer is not None and layer in nodes and layer not in chain:
        chain.append(layer)
        below = child(layer, "file")
        while below is not None and below in nodes and below not in chain:
            chain.append(below)
            below = None if _driver(nodes[below]) in PROTOCOL_DRIVERS else child(below, "file")
        layer = child(layer, "backing")
    return NodeTree(
        device_key=device_key, drive_id=drive_id, root=root, filters=tuple(filters), format=fmt,
        protocol_filters=tuple(protocol_filters), protocol=proto,
        backing=child(current, "backing") if fmt is not None else None,
        virtual_size=int(image.get("virtual-size", 0)),
        cluster_size=int(image["cluster-size"]) if "cluster-size" in image else None,
        read_only=bool(inserted.get("ro")),
        backend_throttle=_backend_throttle(inserted), backing_chain_nodes=tuple(chain))


def image_below(root: str, named_nodes: Iterable[Mapping[str, Any]], graph: Mapping[str, Any]) -> str:
    """The node right below the filters that start at ``root`` (``root`` itself without filters):
    the image a pivot with ``replaces`` swaps. A running job's filter (mirror_top) counts as one."""
    drivers = {str(n["node-name"]): _driver(n) for n in named_nodes if n.get("node-name")}
    children = _children(graph)
    current, seen = root, set()
    while drivers.get(current) in FILTER_DRIVERS | JOB_FILTER_DRIVERS and current not in seen:
        seen.add(current)
        below = children.get(current, {})
        nxt = below.get("file") or below.get("backing")
        if nxt is None:
            break
        current = nxt
    return current


def _driver(node: Mapping[str, Any]) -> str:
    return str(node.get("drv", ""))


def _children(graph: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """{parent node name: {edge name: child node name}} from x-debug-query-block-graph."""
    names = {int(n["id"]): str(n["name"]) for n in graph.get("nodes", []) if n.get("type") == "block-driver"}
    out: dict[str, dict[str, str]] = {}
    for edge in graph.get("edges", []):
        parent, child = names.get(int(edge["parent"])), names.get(int(edge["child"]))
        if parent is not None and child is not None:
            out.setdefault(parent, {})[str(edge["name"])] = child
    return out


def _guess_child(nodes: Mapping[str, Mapping[str, Any]], name: str, role: str) -> str | None:
    """Without the graph: the one protocol node with the format node's filename, else None."""
    if role != "file":
        return None
    filename = nodes[name].get("file")
    matches = [n for n, info in nodes.items() if n != name and _driver(info) in PROTOCOL_DRIVERS
               and info.get("file") == filename]
    if len(matches) > 1:
        raise NodeTreeError(f"several protocol nodes open {filename}; pass x-debug-query-block-graph")
    return matches[0] if matches else None


def _filter_options(node: Mapping[str, Any]) -> dict[str, Any]:
    """A filter's own options as far as its json: filename tells (throttle-group for throttle)."""
    filename = str(node.get("file", ""))
    if not filename.startswith("json:"):
        return {}
    try:
        spec = json.loads(filename[len("json:"):])
    except ValueError:
        return {}
    return {k: v for k, v in spec.items() if k not in ("driver", "file", "backing") and not isinstance(v, dict)}


def _node_info(node: Mapping[str, Any], argv_opts: Mapping[str, Any], *, role: str,
               on_cmdline: bool = False) -> NodeInfo:
    """``on_cmdline``: the node was defined on QEMU's command line, so an option not written there
    has QEMU's default: known, and nothing to carry (DEST gets the same default)."""
    cache = node.get("cache") or {}
    options: dict[str, Any] = {
        "cache.direct": bool(cache.get("direct", False)),
        "cache.no-flush": bool(cache.get("no-flush", False)),
        "detect-zeroes": str(node.get("detect_zeroes", "off")),
    }
    for key in UNREPORTED:
        if key in argv_opts:
            options[key] = argv_opts[key]
    if "discard" not in options and options["detect-zeroes"] == "unmap":
        options["discard"] = "unmap"  # QEMU refuses detect-zeroes=unmap without discard=unmap
    if "aio" not in options and not options["cache.direct"]:
        pass  # threads or io_uring; native is impossible without O_DIRECT, still unknown which
    allowed = CARRIED_OPTIONS if role == "protocol" else FORMAT_NODE_OPTIONS
    options = {k: v for k, v in options.items() if k in allowed}
    unknown = frozenset() if on_cmdline else frozenset(k for k in UNREPORTED if k in allowed and k not in options)
    return NodeInfo(name=str(node["node-name"]), driver=_driver(node), filename=str(node.get("file", "")),
                    read_only=bool(node.get("ro")), options=options, unknown=unknown)


def _on_cmdline(argv: ArgvOptions, node: str, drive_id: str | None) -> bool:
    return node in argv.nodes or bool(drive_id and drive_id in argv.drives)


def _argv_for(argv: ArgvOptions, node: str, drive_id: str | None, role: str) -> Mapping[str, Any]:
    if node in argv.nodes:
        return argv.nodes[node]
    if drive_id and drive_id in argv.drives:
        return argv.drives[drive_id].get(role, {})
    return {}


_THROTTLE_KEYS = ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr", "bps_max", "bps_rd_max", "bps_wr_max",
                  "iops_max", "iops_rd_max", "iops_wr_max", "iops_size", "group")


def _backend_throttle(inserted: Mapping[str, Any]) -> dict[str, Any]:
    """The BlockBackend's throttle limits (block_set_io_throttle), or {} when it has none."""
    limits = {k: inserted[k] for k in _THROTTLE_KEYS if inserted.get(k)}
    return limits if any(k != "group" for k in limits) else {}


# --- DEST ---------------------------------------------------------------------------------------

_OMIT: Any = object()


def dest_blockdev_args(tree: NodeTree, dest_path: str, dest_format: str, fmt_node: str, proto_node: str, *,
                       is_block_device: bool, backing: Any = _OMIT,
                       overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``blockdev-add`` arguments for DEST's format node over its protocol node, with the source's options.

    - The protocol driver is ``host_device`` when DEST is a block device, else ``file`` (whatever the
      source used: a disk moves between files and block devices).
    - ``backing``: passed through when given (``None`` for a qcow2 full copy: never open a backing file
      named in DEST; a node name for a shallow copy onto the source's backing).
    - ``overrides``: carried options set explicitly (``{"aio": "native"}``, ``{"discard": "unmap"}``),
      applied to every node that accepts the option; ``None`` as a value drops the option (QEMU's default).
    - ``read-only`` is never set: the mirror writes to DEST, and QEMU makes the target read-only at
      completion when the source is.
    - Protocol-level filters (``preallocate``) are re-created between the two nodes, named
      ``<proto_node>-<driver>``.
    """
    overrides = dict(overrides or {})
    for key, value in overrides.items():
        _check_option(key, value)
    proto_opts = _merged(tree.protocol.options, overrides, CARRIED_OPTIONS)
    protocol: dict[str, Any] = {"driver": "host_device" if is_block_device else "file", "node-name": proto_node,
                                "filename": dest_path, **_nest(proto_opts)}
    if tree.format is None:
        if dest_format != "raw":
            raise NodeTreeError(f"the source has no format node (raw on {tree.protocol.driver}); a {dest_format} "
                                "DEST would change what the guest sees")
        return protocol
    child: dict[str, Any] = protocol
    for filt in reversed(tree.protocol_filters):
        child = {"driver": filt.driver, "node-name": f"{proto_node}-{filt.driver}", "file": child,
                 **{k: v for k, v in filt.options.items() if k != "node-name"}}
    fmt_opts = _merged(tree.format.options, overrides, FORMAT_NODE_OPTIONS)
    args: dict[str, Any] = {"driver": dest_format, "node-name": fmt_node, "file": child, **_nest(fmt_opts)}
    if backing is not _OMIT:
        args["backing"] = backing
    return args


def _merged(carried: Mapping[str, Any], overrides: Mapping[str, Any], allowed: Sequence[str]) -> dict[str, Any]:
    out = {k: v for k, v in carried.items() if k in allowed}
    for key, value in overrides.items():
        if key not in allowed:
            continue
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _nest(options: Mapping[str, Any]) -> dict[str, Any]:
    """{"cache.direct": True, "aio": "native"} -> {"cache": {"direct": True}, "aio": "native"}."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if "." in key:
            outer, inner = key.split(".", 1)
            out.setdefault(outer, {})[inner] = value
        else:
            out[key] = value
    return out


def _check_option(key: str, value: Any) -> None:
    if key not in CARRIED_OPTIONS:
        raise NodeTreeError(f"unknown DEST option {key!r}; known: {', '.join(CARRIED_OPTIONS)}")
    if value is None:
        return
    if key in ("cache.direct", "cache.no-flush", "auto-read-only"):
        ok = isinstance(value, bool)
    else:
        ok = value in {"aio": AIO_VALUES, "discard": {"ignore", "unmap"}, "detect-zeroes": DETECT_ZEROES_VALUES,
                       "locking": LOCKING_VALUES}[key]
    if not ok:
        raise NodeTreeError(f"invalid value {value!r} for DEST option {key}")


def parse_dest_option(text: str) -> tuple[str, Any]:
    """``--dest-option KEY=VALUE`` -> (key, value) with QEMU's types (``cache.direct=on`` -> True)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        raise NodeTreeError(f"--dest-option takes KEY=VALUE, not {text!r}")
    value: Any = raw.strip()
    if key in ("cache.direct", "cache.no-flush", "auto-read-only"):
        if value not in ("on", "off", "true", "false"):
            raise NodeTreeError(f"{key} takes on or off, not {value!r}")
        value = value in ("on", "true")
    elif key == "discard":
        value = DISCARD_VALUES.get(value, value)
    elif value in ("default", ""):
        value = None
    _check_option(key, value)
    return key, value


def parse_dest_options(texts: Iterable[str]) -> dict[str, Any]:
    """Every ``--dest-option`` text of a request, as DEST's node options (a key's last value wins).

    :raise UsageError: a text is not a valid option (its message says why).
    """
    try:
        return dict(parse_dest_option(text) for text in texts)
    except NodeTreeError as exc:
        raise UsageError(str(exc)) from None


def mirror_target_args(tree: NodeTree) -> dict[str, Any]:
    """The ``device`` and ``replaces`` of ``blockdev-mirror`` that swap only the image at the pivot.

    ``device`` is the BlockBackend's root (QEMU 7.2 mirrors root nodes only); when filters sit above
    the image, ``replaces`` names the image (format) node so that completion re-points the lowest
    filter to DEST instead of replacing the whole chain with DEST.
    """
    args: dict[str, Any] = {"device": tree.root}
    if tree.filters:
        args["replaces"] = tree.image.name
    return args


def unknown_option_warnings(tree: NodeTree) -> list[str]:
    """Operator-facing sentences for the options DEST gets QEMU's defaults for because QEMU did not tell."""
    defaults = {"aio": "threads", "discard": "ignore", "locking": "auto", "auto-read-only": "off"}
    out = []
    for role, names in sorted(tree.unknown.items()):
        for name in sorted(names):
            if name == "auto-read-only":
                continue  # only changes how a read-only open falls back; not worth a warning
            node = tree.format if role == "format" else tree.protocol
            assert node is not None
            out.append(f"QEMU does not report the {name} option of {role} node {node.name}: DEST's {role} node "
                       f"gets QEMU's default ({name}={defaults[name]}); set it with --dest-option {name}=VALUE")
    return out


def node_options(blockdev_args: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The nodes of a (nested) blockdev-add argument dict, top first, without their children."""
    out = []
    node: Any = blockdev_args
    while isinstance(node, Mapping):
        out.append({k: v for k, v in node.items() if k != "file"})
        node = node.get("file")
    return out


def needs_o_direct(blockdev_args: Mapping[str, Any]) -> bool:
    """True when any node of these blockdev-add arguments opens its file with O_DIRECT."""
    return any(bool((n.get("cache") or {}).get("direct")) or n.get("aio") == "native"
               for n in node_options(blockdev_args))


def o_direct_refusal(blockdev_args: Mapping[str, Any], dest_path: str, supports_o_direct: bool) -> str | None:
    """A refusal message when DEST needs O_DIRECT and its storage cannot do it, else None."""
    if not needs_o_direct(blockdev_args) or supports_o_direct:
        return None
    what = [k for k in ("cache.direct=on", "aio=native")
            if any((k == "cache.direct=on" and (n.get("cache") or {}).get("direct"))
                   or (k == "aio=native" and n.get("aio") == "native") for n in node_options(blockdev_args))]
    return (f"the source disk is opened with {' and '.join(what)} (O_DIRECT), but the storage of {dest_path} "
            "refuses O_DIRECT; choose another destination or set --dest-option cache.direct=off"
            + (" --dest-option aio=threads" if "aio=native" in what else ""))


# --- the command line of a local QEMU -----------------------------------------------------------

def options_from_argv(argv: Sequence[str]) -> ArgvOptions:
    """The carried options written in ``-blockdev`` (keyval or JSON) and ``-drive`` arguments."""
    nodes: dict[str, dict[str, Any]] = {}
    drives: dict[str, dict[str, dict[str, Any]]] = {}
    cor: set[str] = set()
    for opt, value in _options(argv):
        if opt == "-blockdev":
            spec = json.loads(value) if value.lstrip().startswith("{") else _keyval_tree(value)
            _collect_blockdev(spec, nodes)
        elif opt == "-drive":
            flat = _keyval(value)
            if "id" in flat:
                drives[flat["id"]] = _drive_options(flat)
                if _onoff(flat.get("copy-on-read", "off")):
                    cor.add(flat["id"])
    return ArgvOptions(nodes=nodes, drives=drives, copy_on_read=frozenset(cor))


def _options(argv: Sequence[str]) -> Iterable[tuple[str, str]]:
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-blockdev", "--blockdev", "-drive", "--drive"):
            yield "-" + arg.lstrip("-"), argv[i + 1]


def _keyval(text: str) -> dict[str, str]:
    """QEMU's key=value,key=value with ',,' for a comma; a bare key means key=on."""
    out: dict[str, str] = {}
    parts: list[str] = []
    current = ""
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    parts.append(current)
    for part in parts:
        if not part:
            continue
        key, sep, value = part.partition("=")
        out[key] = value if sep else "on"
    return out


def _keyval_tree(text: str) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in _keyval(text).items():
        where = tree
        *outer, last = key.split(".")
        for part in outer:
            where = where.setdefault(part, {})
        where[last] = value
    return tree


def _onoff(value: Any) -> bool:
    return value is True or str(value) in ("on", "true", "yes")


def _carried_from_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "aio" in spec:
        out["aio"] = str(spec["aio"])
    if "discard" in spec:
        out["discard"] = DISCARD_VALUES.get(str(spec["discard"]), str(spec["discard"]))
    if "locking" in spec:
        out["locking"] = str(spec["locking"])
    if "auto-read-only" in spec:
        out["auto-read-only"] = _onoff(spec["auto-read-only"])
    return out


def _collect_blockdev(spec: Mapping[str, Any], nodes: dict[str, dict[str, Any]]) -> None:
    name = spec.get("node-name")
    if name:
        nodes[str(name)] = _carried_from_spec(spec)
    for key in ("file", "backing"):
        sub = spec.get(key)
        if isinstance(sub, Mapping):
            _collect_blockdev(sub, nodes)


def _drive_options(flat: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """-drive: discard and auto-read-only are inherited by the file child; aio and locking are file options."""
    shared: dict[str, Any] = {}
    if "discard" in flat:
        shared["discard"] = DISCARD_VALUES.get(flat["discard"], flat["discard"])
    protocol = dict(shared)
    if "aio" in flat:
        protocol["aio"] = flat["aio"]
    file_level = {k[len("file."):]: v for k, v in flat.items() if k.startswith("file.")}
    protocol.update(_carried_from_spec(file_level))
    return {"format": shared, "protocol": protocol}


# --- probes (the only I/O in this module) -------------------------------------------------------

def probe_o_direct(dest_path: str) -> bool:
    """Whether DEST's storage accepts O_DIRECT I/O, found without touching DEST.

    An existing block device is opened read-only with O_DIRECT and one aligned block is read; for a
    file, a scratch file is created beside it with O_DIRECT, one aligned block written, and removed
    (some file systems accept the open and fail the I/O, so both are tried).
    """
    block = 4096
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT wants
    try:
        if os.path.exists(dest_path) and stat.S_ISBLK(os.stat(dest_path).st_mode):
            try:
                fd = os.open(dest_path, os.O_RDONLY | os.O_DIRECT)
            except OSError:
                return False
            try:
                os.preadv(fd, [buf], 0)
            except OSError:
                return False
            finally:
                os.close(fd)
            return True
        directory = os.path.dirname(os.path.abspath(dest_path))
        probe = os.path.join(directory, f".blockcopy-odirect-{os.urandom(4).hex()}")
        try:
            fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_DIRECT, 0o600)
        except OSError as exc:
            # Linux creates the file before it checks O_DIRECT (ramfs: EINVAL, file left behind);
            # O_EXCL and the random name make it ours to remove, unless O_EXCL itself refused
            # (EEXIST: a file of someone else's by that name).
            if exc.errno != errno.EEXIST:
                with contextlib.suppress(OSError):
                    os.unlink(probe)
            return False
        try:
            os.pwritev(fd, [buf], 0)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(probe)
    finally:
        buf.close()


def qemu_argv(qmp_socket: str) -> list[str] | None:
    """The command line of the QEMU serving ``qmp_socket`` (a local unix socket), or None.

    The pid comes from SO_PEERCRED (the credentials of the listening QEMU; this works even while
    another client holds the monitor, as the kernel accepts the connection into the backlog), then
    ``/proc/PID/cmdline``. None when QEMU is elsewhere (another pid namespace) or the socket is dead.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            sock.connect(qmp_socket)
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if not pid:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
