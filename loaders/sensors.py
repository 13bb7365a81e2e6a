"""The product's kernel sensors: load sensors.bpf.o, attach every hook, program the policy maps.

The policy lives in two slots of every policy map. :meth:`Sensors.apply_policy`
writes the inactive slot, then flips one u32 (``config[ACTIVE_SLOT]``) that
every program reads once per decision: a decision is taken wholly by the old
policy or wholly by the new one, never by neither.
"""

from __future__ import annotations

import bisect
import glob
import ipaddress
import itertools
import operator
import os
import socket
import struct
import threading
import time
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple, Protocol

import structlog

from loaders import abi, bpffs, errors, native
from loaders import cgroup as cg
from loaders._ffi import ffi, lib
from loaders.links import Link
from loaders.maps import BPF_F_NO_PREALLOC, BPF_MAP_TYPE_ARRAY_OF_MAPS, BPF_MAP_TYPE_LPM_TRIE, Map
from loaders.object import BpfObject

log = structlog.get_logger("tool.sensors")

OBJECT_PATH = Path(__file__).parent / "objects" / "sensors.bpf.o"

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_LPM_KEY = abi.LPM_KEY.compile()
_LPM_VALUE = abi.LPM_VALUE.compile()
_RULE = abi.RULE.compile()
_SLOT_CFG = abi.SLOT_CFG.compile()
_EXE_KEY = abi.EXE_KEY.compile()
_ID_KEY = abi.ID_KEY.compile()
_CGROUP_KEY = abi.CGROUP_KEY.compile()
_COMM_KEY = abi.COMM_KEY.compile()
_TASK_INFO = abi.TASK_INFO.compile()
_ENTRY_NAMES = ("rule_id", "who_class", "direction", "protocol", "network", "port_lo", "port_hi", "action")
_ENTRY_FIELDS = operator.attrgetter(*_ENTRY_NAMES)
# Network masks by prefix length, for finding the node that encloses another.
_ADDRESS = (1 << 128) - 1
_MASKS = [_ADDRESS ^ ((1 << (128 - plen)) - 1) for plen in range(129)]
# A tool_rule with its padding as pad bytes, so that a node's rule tuples pack as they are.
_RULE_PADDED = struct.Struct("<QHHB3xI4x")
assert _RULE_PADDED.size == abi.RULE.size
# Node keys (see _group_entries): the bits above the address, by direction.
_DIRECTION_BITS = {name: code << 144 for name, code in abi.DIRECTIONS.items()}
_KEY_BITS_BASE = abi.LPM_KEY_BITS
assert abi.LPM_KEY.offsets()["addr"] == (8, 16) and abi.LPM_KEY.offsets()["direction"] == (5, 1)
# Where the slot byte sits in a tool_lpm_key. A tool_lpm_value is one little-endian u64 whose low
# 32 bits are ``first``: a slot's values are those for slot 0 plus slot * SLOT_RULES.
_SLOT_OFFSET = abi.LPM_KEY.offsets()["slot"][0]
assert abi.LPM_VALUE.offsets()["first"] == (0, 4) and abi.LPM_VALUE.size == 8
assert 2 * abi.SLOT_RULES <= 1 << 32
# Recorded for an LPM entry whose write may have failed: no real value is negative.
_UNKNOWN_LPM_VALUE = -1

# Programs attached to the cgroup, and what the user loses when one is missing.
CGROUP_PROGRAMS = {
    "tool_connect4": "outbound IPv4 TCP/connected UDP",
    "tool_connect6": "outbound IPv6 TCP/connected UDP",
    "tool_sendmsg4": "unconnected IPv4 UDP (DNS)",
    "tool_sendmsg6": "unconnected IPv6 UDP (DNS)",
    "tool_bind4": "IPv4 listeners",
    "tool_bind6": "IPv6 listeners",
    "tool_post_bind4": "attribution of inbound IPv4 connections",
    "tool_post_bind6": "attribution of inbound IPv6 connections",
    "tool_sock_create": "raw inet sockets",
    "tool_ingress": "inbound TCP connection attempts",
    "tool_sockops": "accepted inbound TCP connections",
}
TRACE_PROGRAMS = {
    "tool_exec": "executable of short-lived processes",
    "tool_fork": "identity of forked processes",
    "tool_exit": "process exits",
    "tool_packet_socket": "AF_PACKET sockets (needs tracefs)",
}
_REQUIRED = ("tool_connect4", "tool_connect6", "tool_sendmsg4", "tool_sendmsg6")


class WhoClassLike(Protocol):
    """A 'who' selector of the compiled policy (see pipeline.policy)."""

    id: int
    exe: list[str] | None
    comm: list[str] | None
    uid: list[int] | None
    gid: list[int] | None
    cgroup: list[str] | None


class KernelRuleLike(Protocol):
    """One kernel rule entry of the compiled policy."""

    rule_id: int
    who_class: int
    direction: str
    protocol: int
    network: ipaddress.IPv6Network
    port_lo: int
    port_hi: int
    action: str


class CompiledPolicyLike(Protocol):
    """What :func:`build_tables` reads from a compiled policy."""

    @property
    def who_classes(self) -> Sequence[Any]: ...

    @property
    def entries(self) -> Sequence[Any]: ...

    @property
    def defaults(self) -> Mapping[str, Mapping[str, str]]: ...


class Node(NamedTuple):
    """An LPM node: the rules whose address is exactly this prefix."""

    direction: int
    protocol: int
    network: ipaddress.IPv6Network
    rules: list[tuple[int, int, int, int, int]]  # who, lo, hi, action, rule_id; sorted by rule_id
    parent_len: int = 0  # key bits of the nearest enclosing node, 0 = none
    prefixlen: int = 0  # network's length and first address, as integers
    addr: int = 0


@dataclass
class KernelTables:
    """A policy resolved against this host, ready to be written into one slot."""

    exe: dict[tuple[int, int], int] = field(default_factory=dict)  # (kernel dev, ino) -> mask
    uid: dict[int, int] = field(default_factory=dict)
    gid: dict[int, int] = field(default_factory=dict)
    cgroup: dict[int, int] = field(default_factory=dict)  # cgroup id -> mask
    comm: dict[bytes, int] = field(default_factory=dict)
    wildcard: list[int] = field(default_factory=lambda: [0] * 5)
    dims_used: int = 0
    defaults: bytes = bytes(8)
    unresolved: list[str] = field(default_factory=list)  # exe/cgroup selectors that matched nothing here
    # The LPM nodes and the rules they point at, packed as the maps hold them, for slot 0
    # (Sensors.apply_policy patches the slot in): one tool_lpm_key and one tool_lpm_value per node,
    # in the same order, and the nodes' rules end to end (a value's ``first`` counts from 0).
    lpm_keys: bytes = b""
    lpm_values: bytes = b""
    rules: bytes = b""

    @property
    def rule_entries(self) -> int:
        return len(self.rules) // abi.RULE.size

    @property
    def nodes(self) -> list[Node]:
        """The LPM nodes, unpacked (for inspection; the maps are written from the packed form)."""
        out: list[Node] = []
        rules = list(_RULE_PADDED.iter_unpack(self.rules))
        key_size = abi.LPM_KEY.size
        for i, (first, count, parent_len) in enumerate(_LPM_VALUE.iter_unpack(self.lpm_values)):
            key = int.from_bytes(self.lpm_keys[i * key_size : (i + 1) * key_size], "big")
            network = _key_network(key)
            direction, protocol = key >> 144 & 0xFF, key >> 136 & 0xFF
            node_rules = rules[first : first + count]
            out.append(Node(direction, protocol, network, node_rules, parent_len, network.prefixlen, key & _ADDRESS))
        return out


class TablesError(ValueError):
    """The policy cannot be represented in the kernel maps (says which limit and where)."""


def _resolve_exe(patterns: Iterable[str], unresolved: list[str]) -> set[tuple[int, int]]:
    ids: set[tuple[int, int]] = set()
    for pattern in patterns:
        paths = glob.glob(pattern, recursive=True) if glob.has_magic(pattern) else [pattern]
        found = False
        for p in paths:
            try:
                st = os.stat(p)
            except OSError:
                continue
            ids.add((abi.kernel_dev(st.st_dev), st.st_ino))
            found = True
        if not found:
            unresolved.append(f"exe {pattern}")
    return ids


def resolve_cgroups(patterns: Iterable[str], root: str, unresolved: list[str] | None = None) -> set[int]:
    """The ids (inode numbers) of the cgroups the selectors match now; misses go to ``unresolved``."""
    ids: set[int] = set()
    for pattern in patterns:
        rel = pattern.lstrip("/")
        full = os.path.join(root, rel) if rel else root
        paths = glob.glob(full, recursive=True) if glob.has_magic(full) else [full]
        found = False
        for p in paths:
            if os.path.isdir(p):
                ids.add(os.stat(p).st_ino)
                found = True
        if not found and unresolved is not None:
            unresolved.append(f"cgroup {pattern}")
    return ids


def _comm_key(comm: str) -> bytes:
    raw = comm.encode()[: abi.COMM_LEN - 1]
    return raw.ljust(abi.COMM_LEN, b"\0")


def build_tables(policy: CompiledPolicyLike, cgroup_root: str) -> KernelTables:
    """Resolve a compiled policy against this host (executables, cgroups) into kernel tables.

    Args:
        policy: the compiled policy.
        cgroup_root: mount point of the cgroup v2 hierarchy.

    Returns:
        The tables for :meth:`Sensors.apply_policy`.

    Raises:
        TablesError: more than 64 who-classes, too many rules on one prefix, or nesting too deep.
    """
    # The tables are packed bytes, which the cyclic garbage collector does not track: building
    # them allocates almost nothing it would scan, so it is not paused here.
    return _build_tables(policy, cgroup_root)


def _build_tables(policy: CompiledPolicyLike, cgroup_root: str) -> KernelTables:
    t = KernelTables()
    classes = list(policy.who_classes)
    if len(classes) > 64:
        raise TablesError(f"policy has {len(classes)} distinct 'who' selectors; the kernel holds at most 64")
    all_bits = 0
    for wc in classes:
        bit = 1 << wc.id
        all_bits |= bit
        dims: list[tuple[int, Any]] = [
            (abi.DIM_EXE, wc.exe),
            (abi.DIM_UID, wc.uid),
            (abi.DIM_GID, wc.gid),
            (abi.DIM_CGROUP, wc.cgroup),
            (abi.DIM_COMM, wc.comm),
        ]
        for dim, values in dims:
            if values is None:
                t.wildcard[dim] |= bit
                continue
            t.dims_used |= 1 << dim
            target: dict[Any, int]
            keys: Iterable[Any]
            if dim == abi.DIM_EXE:
                target, keys = t.exe, _resolve_exe(values, t.unresolved)
            elif dim == abi.DIM_UID:
                target, keys = t.uid, values
            elif dim == abi.DIM_GID:
                target, keys = t.gid, values
            elif dim == abi.DIM_CGROUP:
                target, keys = t.cgroup, resolve_cgroups(values, cgroup_root, t.unresolved)
            else:
                target, keys = t.comm, [_comm_key(c) for c in values]
            for k in keys:
                target[k] = target.get(k, 0) | bit  # type: ignore[index, arg-type]
    # A dimension nobody conditions on must not filter anyone out.
    for dim in range(5):
        if not t.dims_used & (1 << dim):
            t.wildcard[dim] = ~0 & 0xFFFFFFFFFFFFFFFF

    _pack_nodes(t, policy.entries)

    defaults = bytearray(8)
    for mode_index, mode in enumerate(("detect", "prevent")):
        per_dir = policy.defaults.get(mode, {})
        for name, direction in abi.DIRECTIONS.items():
            action = per_dir.get(name, "allow")
            defaults[mode_index * abi.DIR_MAX + direction - 1] = abi.ACTIONS[action]
    t.defaults = bytes(defaults)
    return t


def _pack_nodes(t: KernelTables, entries: Sequence[Any]) -> None:
    """Group the entries into LPM nodes, link each to its enclosing node and pack both maps' contents.

    The nodes go in key order: the kernel inserts and deletes trie nodes in that order about a
    third faster than in the policy's order, enclosing prefixes are found a run of equal lengths at
    a time (:func:`_link_parents`), and the order does not change when rules are reordered.
    """
    groups: dict[int, bytes] | None = getattr(entries, "kernel_nodes", None)  # grouped by the compiler
    if groups is None:
        groups = _group_entries(entries)
    if groups is None:  # a node lists its rules by rule id; the compiler's entries come in that order
        groups = _group_entries(sorted(entries, key=operator.attrgetter("rule_id")))
        assert groups is not None
    helper = native.get()
    if helper is not None:
        _pack_nodes_natively(t, groups, helper)
        return
    node_keys = sorted(groups)
    node_rules = list(map(groups.__getitem__, node_keys))
    rule_size = _RULE_PADDED.size
    counts = [size // rule_size for size in map(len, node_rules)]
    most = max(counts, default=0)
    if most > abi.MAX_NODE_RULES:
        raise _crowded(node_keys[counts.index(most)], most)
    t.lpm_keys = _pack_keys(node_keys)
    t.lpm_values = _pack_values(counts, _link_parents(node_keys))
    t.rules = b"".join(node_rules)


def _pack_nodes_natively(t: KernelTables, groups: dict[int, bytes], helper: native.Native) -> None:
    """:func:`_pack_nodes`'s sorting, linking and values in the native helper: the same bytes, faster."""
    node_keys = list(groups)
    node_rules = list(groups.values())
    packed = helper.pack(
        _pack_keys(node_keys), array("I", map(len, node_rules)), _LPM_KEY.size, _RULE_PADDED.size, abi.MAX_NESTING
    )
    if packed.most > abi.MAX_NODE_RULES:
        raise _crowded(node_keys[packed.order[packed.most_at]], packed.most)
    if packed.too_deep >= 0:
        raise _too_deep(node_keys[packed.order[packed.too_deep]])
    t.lpm_keys, t.lpm_values = packed.keys, packed.values
    t.rules = b"".join(map(node_rules.__getitem__, packed.order))


def _crowded(key: int, most: int) -> TablesError:
    return TablesError(
        f"{most} rules share the destination {_key_network(key)} ({_dir_name(key >> 144 & 0xFF)}, "
        f"protocol {key >> 136 & 0xFF}); the kernel evaluates at most {abi.MAX_NODE_RULES} per address "
        "prefix: merge rules (list several ports or users in one rule)"
    )


def _pack_keys(node_keys: Sequence[int]) -> bytes:
    """The tool_lpm_keys of the nodes, end to end: a node key is its key's bytes read big-endian."""
    big: Literal["big"] = "big"
    return b"".join(map(int.to_bytes, node_keys, itertools.repeat(_LPM_KEY.size), itertools.repeat(big)))


def _pack_values(counts: Sequence[int], parent_lens: Sequence[int]) -> bytes:
    """The tool_lpm_values of nodes with ``counts`` rules each, stored end to end in the same order.

    A tool_lpm_value (u32 first, u16 count, u16 parent_len) is one little-endian u64, so the
    whole column packs in one ``struct`` call.
    """
    firsts = itertools.accumulate(counts, initial=0)  # one more than counts: the total, left over
    rows = zip(firsts, counts, parent_lens, strict=False)
    values = [first | count << 32 | parent << 48 for first, count, parent in rows]
    return struct.pack(f"<{len(values)}Q", *values)


def _group_entries(entries: Sequence[Any]) -> dict[int, bytes] | None:
    """Each LPM node's rules, packed end to end, by node key; None if the entries' rule ids go down.

    A node key is the node's tool_lpm_key for slot 0 read as a big-endian integer:
    ``(LPM_KEY_BITS + prefixlen) << 184 | direction << 144 | protocol << 136 | address``. Integers
    hash faster than IPv6Network objects, and neither they nor the packed rules are tracked by
    the garbage collector.
    """
    groups: dict[int, bytes] = {}
    group_of = groups.get
    pack_rule = _RULE_PADDED.pack
    direction_bits, actions, key_bits_base = _DIRECTION_BITS, abi.ACTIONS, _KEY_BITS_BASE
    last_net: ipaddress.IPv6Network | None = None
    net_bits = last_id = 0
    # Named tuples in KernelRule's field order (the compiler's) unpack as they are.
    in_order = all(getattr(kind, "_fields", None) == _ENTRY_NAMES for kind in {type(e) for e in entries})
    rows: Iterable[tuple[Any, ...]] = entries if in_order else map(_ENTRY_FIELDS, entries)
    for rule_id, who_class, direction, protocol, net, lo, hi, action in rows:
        if rule_id < last_id:
            return None
        last_id = rule_id
        if net is not last_net:  # a rule's entries share their network object
            last_net = net
            try:  # _network_bits, inline
                net_bits = (key_bits_base + net._prefixlen) << 184 | net.network_address._ip
            except AttributeError:
                net_bits = _network_bits(net)
        if direction == "raw":
            # A raw rule has no port or protocol (docs/policy.md): the kernel passes the socket's
            # protocol as the port (an ethertype for AF_PACKET, up to 65535), so cover all of it.
            lo, hi = 0, 0xFFFF
        key = net_bits | direction_bits[direction] | protocol << 136
        rule = pack_rule(1 << who_class, lo, hi, actions[action], rule_id)
        group = group_of(key)
        groups[key] = rule if group is None else group + rule
    return groups


def _network_bits(net: ipaddress.IPv6Network) -> int:
    """The bits of a node key (see _group_entries) that come from its network."""
    prefixlen: int
    address: int
    try:  # the attributes behind the public properties, at a tenth of their cost
        prefixlen, address = net._prefixlen, net.network_address._ip  # type: ignore[attr-defined]
    except AttributeError:
        prefixlen, address = net.prefixlen, int(net.network_address)
    return (_KEY_BITS_BASE + prefixlen) << 184 | address


def _key_network(key: int) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network((key & _ADDRESS, (key >> 184) - abi.LPM_KEY_BITS))


# Program types and helper ids (uapi/linux/bpf.h) of the fast path's optional helpers.
_PROG_TRACEPOINT, _PROG_CGROUP_SKB, _PROG_CGROUP_SOCK, _PROG_SOCK_OPS, _PROG_CGROUP_SOCK_ADDR = 5, 8, 9, 13, 18
_FUNC_GET_CURRENT_TASK_BTF, _FUNC_KTIME_GET_COARSE_NS = 158, 160
# knob in sensors.bpf.c -> (helper, the program types of every program that can reach it)
_FAST_PATH_KNOBS = {
    "have_task_btf": (
        _FUNC_GET_CURRENT_TASK_BTF,
        (_PROG_CGROUP_SOCK_ADDR, _PROG_CGROUP_SOCK, _PROG_TRACEPOINT),
    ),
    "have_coarse_clock": (
        _FUNC_KTIME_GET_COARSE_NS,
        (_PROG_CGROUP_SOCK_ADDR, _PROG_CGROUP_SOCK, _PROG_CGROUP_SKB, _PROG_SOCK_OPS),
    ),
}


def _fast_path_knobs() -> dict[str, bool]:
    """Which of the fast path's newer helpers (5.11) this kernel lets each program that uses them call.

    Returns:
        Knob name in sensors.bpf.c -> whether to enable it. Without them the programs fall back to
        the task map and the boot clock, as on the agent's 5.8 floor.
    """
    out = {}
    for knob, (helper, prog_types) in _FAST_PATH_KNOBS.items():
        out[knob] = all(lib().libbpf_probe_bpf_helper(t, helper, ffi.NULL) == 1 for t in prog_types)
    return out


def _rejected_program(libbpf_log: str) -> str | None:
    """Name of the program the verifier refused, from libbpf's log."""
    for line in reversed(libbpf_log.splitlines()):
        if "libbpf: prog '" in line and ("load failed" in line or "failed to load" in line):
            return line.split("prog '", 1)[1].split("'", 1)[0]
    return None


def _dir_name(direction: int) -> str:
    return {v: k for k, v in abi.DIRECTIONS.items()}[direction]


def _link_parents(node_keys: Sequence[int]) -> list[int]:
    """Find each node's nearest enclosing node of the same direction and protocol.

    Sorted node keys come in runs of one (prefix length, direction, protocol). For each run and
    each shorter length of its direction and protocol, the run's addresses are masked to that
    length and looked up among that length's addresses a whole run at a time with ``map``: a
    few C-level steps per node and shorter length in use, not a Python loop per node.

    Args:
        node_keys: the node keys (see _group_entries), sorted.

    Returns:
        For each node, the LPM key bits of its enclosing node, 0 when it has none.

    Raises:
        TablesError: a node is nested in more than ``abi.MAX_NESTING`` others.
    """
    parent_lens = [0] * len(node_keys)
    # key >> 136 is (LPM key length) << 48 | direction << 8 | protocol: a node's length and group.
    runs: dict[int, tuple[int, int]] = {}  # key >> 136 -> (start, end) of its run
    start = 0
    while start < len(node_keys):
        top = node_keys[start] >> 136
        end = bisect.bisect_left(node_keys, (top + 1) << 136, start)
        runs[top] = (start, end)
        start = end
    lengths: dict[int, list[int]] = {}  # direction << 8 | protocol -> the LPM key lengths in use, ascending
    addresses_of: dict[int, frozenset[int]] = {}  # key >> 136 -> the addresses of that run, made when asked
    for top in runs:
        lengths.setdefault(top & 0xFFFF, []).append(top >> 48)
    for top, (start, end) in runs.items():
        length, group = top >> 48, top & 0xFFFF
        for shorter in lengths[group]:  # ascending: a longer enclosing length overwrites a shorter one
            if shorter >= length:
                break
            enclosing = addresses_of.get(shorter << 48 | group)
            if enclosing is None:
                first, last = runs[shorter << 48 | group]
                enclosing = frozenset(map(operator.and_, node_keys[first:last], itertools.repeat(_ADDRESS)))
                addresses_of[shorter << 48 | group] = enclosing
            masked = map(operator.and_, node_keys[start:end], itertools.repeat(_MASKS[shorter - abi.LPM_KEY_BITS]))
            for i in itertools.compress(range(start, end), map(enclosing.__contains__, masked)):
                parent_lens[i] = shorter
    nested = [i for i, bits in enumerate(parent_lens) if bits]
    _check_nesting(node_keys, parent_lens, nested)
    return parent_lens


def _check_nesting(node_keys: Sequence[int], parent_lens: Sequence[int], nested: Sequence[int]) -> None:
    """Refuse a node nested in ``abi.MAX_NESTING`` or more others: the kernel walks no further.

    Raises:
        TablesError: naming the first such node, in key order.
    """
    parent_of: dict[int, int] = {}
    for i in nested:
        key, bits = node_keys[i], parent_lens[i]
        parent_of[key] = bits << 184 | (key >> 136 & 0xFFFF) << 136 | key & _MASKS[bits - abi.LPM_KEY_BITS]
    for key in parent_of:  # walk each chain up to its root
        depth, cur = 0, key
        while cur in parent_of:
            depth += 1
            if depth >= abi.MAX_NESTING:
                raise _too_deep(key)
            cur = parent_of[cur]


def _too_deep(key: int) -> TablesError:
    return TablesError(
        f"address {_key_network(key)} is nested in more than {abi.MAX_NESTING} other "
        f"prefixes of the policy; the kernel walks at most {abi.MAX_NESTING}"
    )


def _new_trie(slot: int) -> Map:
    """An empty LPM trie for one slot, exactly like the inner map template of ``rule_nodes`` in sensors.bpf.c."""
    return Map.create(
        f"tool_nodes{slot}", BPF_MAP_TYPE_LPM_TRIE, _LPM_KEY.size, _LPM_VALUE.size, abi.SLOT_NODES, BPF_F_NO_PREALLOC
    )


@dataclass
class _LpmPlan:
    """The trie operations that turn a slot's nodes into a policy's: how many, and what they are.

    ``writes`` counts deletes and writes. The Python path lists them (``stale`` keys to delete,
    ``changed`` keys with their new values, ``new`` the resulting contents); the native helper
    finds them again as it writes, from the packed tables (``native_old``: the slot's tables).
    """

    writes: int
    stale: list[bytes] = field(default_factory=list)
    changed: list[bytes] = field(default_factory=list)
    changed_values: list[int] = field(default_factory=list)
    new: dict[bytes, int] | None = None
    native_old: tuple[bytes, bytes] | None = None


def _fill_plan(plan: _LpmPlan) -> _LpmPlan:
    """The plan that writes ``plan``'s result into an empty trie: every node of the new policy."""
    if plan.new is None:  # the native helper's: it diffs against empty tables
        return _LpmPlan(0, native_old=(b"", b""))
    return _LpmPlan(len(plan.new), [], list(plan.new), list(plan.new.values()))


def _plan_lpm_writes(contents: _SlotContents, tables: KernelTables, helper: native.Native | None) -> _LpmPlan:
    """What writing ``tables`` over ``contents`` takes, counted by the native helper where it can."""
    if helper is not None and contents.lpm_keys is not None and contents.lpm_values is not None:
        old = (contents.lpm_keys, contents.lpm_values)
        dry = helper.sync(-1, old, (tables.lpm_keys, tables.lpm_values), _LPM_KEY.size, _SLOT_OFFSET, 0, 0)
        return _LpmPlan(dry.deleted + dry.written, native_old=old)
    old_entries = contents.lpm_entries()
    keys = _split_keys(tables.lpm_keys)
    values = struct.unpack(f"<{len(keys)}Q", tables.lpm_values)
    new = dict(zip(keys, values, strict=True))
    stale = list(itertools.filterfalse(new.__contains__, old_entries)) if old_entries else []
    differs = list(map(operator.ne, map(old_entries.get, keys), values)) if old_entries else [True] * len(keys)
    changed = list(itertools.compress(keys, differs))
    return _LpmPlan(len(stale) + len(changed), stale, changed, list(itertools.compress(values, differs)), new)


def _write_lpm(trie: Map, plan: _LpmPlan, tables: KernelTables, slot: int, helper: native.Native | None) -> None:
    """Carry out ``plan`` on ``trie`` (see :func:`_fill_plan` for an empty trie)."""
    if helper is not None and plan.native_old is not None:
        new = (tables.lpm_keys, tables.lpm_values)
        done = helper.sync(trie.fd, plan.native_old, new, _LPM_KEY.size, _SLOT_OFFSET, slot, slot * abi.SLOT_RULES)
        if done.error:
            deleting = done.phase == 1
            what = "bpf_map_delete_elem" if deleting else "bpf_map_update_elem"
            where = f"node {done.failed + 1} of {len((plan.native_old if deleting else new)[0]) // _LPM_KEY.size}"
            raise errors.from_errno(f"{what}({trie.name}, {where})", -done.error)
        return
    if plan.stale:
        trie.delete_packed(_keys_in_slot(plan.stale, slot))
    if plan.changed:
        trie.update_packed(_keys_in_slot(plan.changed, slot), _values_in_slot(plan.changed_values, slot))


@dataclass
class _SlotContents:
    """What one slot holds, so that the next write into it changes only what differs.

    ``lpm`` maps each LPM key the slot holds to its value, both as packed for slot 0 (the value as
    its little-endian u64; :data:`_UNKNOWN_LPM_VALUE` where a failed write left it unknown), in
    key order; None when ``lpm_keys`` and ``lpm_values`` say it all (see :meth:`lpm_entries`).
    ``lpm_keys`` and ``lpm_values`` are the packed tables it was written from (None: not exactly
    those, compare entry by entry with ``lpm``); ``rules`` is the slot's part of the rules array as
    written (None: unknown, write it whole).
    """

    lpm: dict[bytes, int] | None = None
    lpm_keys: bytes | None = b""
    lpm_values: bytes | None = b""
    rules: bytes | None = b""
    exe: list[bytes] = field(default_factory=list)
    uid: list[bytes] = field(default_factory=list)
    gid: list[bytes] = field(default_factory=list)
    cgroup: list[bytes] = field(default_factory=list)
    comm: list[bytes] = field(default_factory=list)

    def lpm_entries(self) -> dict[bytes, int]:
        """``lpm``, made from the packed tables when it is not kept (the native helper diffs those)."""
        if self.lpm is None:
            assert self.lpm_keys is not None and self.lpm_values is not None
            keys = _split_keys(self.lpm_keys)
            self.lpm = dict(zip(keys, struct.unpack(f"<{len(keys)}Q", self.lpm_values), strict=True))
        return self.lpm


def _split_keys(blob: bytes) -> tuple[bytes, ...]:
    """The tool_lpm_keys packed end to end in ``blob``, one ``bytes`` each, split by one ``struct`` call."""
    return struct.unpack(f"{_LPM_KEY.size}s" * (len(blob) // _LPM_KEY.size), blob)


def _keys_in_slot(keys: Iterable[bytes], slot: int) -> bytes:
    """LPM keys packed for slot 0, end to end in one buffer for ``slot`` (the slot is a byte of the key)."""
    blob = b"".join(keys)
    if not slot:
        return blob
    patched = bytearray(blob)
    patched[_SLOT_OFFSET :: _LPM_KEY.size] = bytes([slot]) * (len(blob) // _LPM_KEY.size)
    return bytes(patched)


def _values_in_slot(values: Sequence[int], slot: int) -> bytes:
    """LPM values made for slot 0, packed end to end for ``slot``: ``first`` moves by the slot's rules offset."""
    shifted = map(operator.add, values, itertools.repeat(slot * abi.SLOT_RULES))
    return struct.pack(f"<{len(values)}Q", *shifted)


_LISTENER_KEY = abi.LISTENER_KEY.compile()
_LISTENER = abi.LISTENER.compile()
_TASK = abi.TASK.compile()
SO_NETNS_COOKIE = 71  # linux/socket.h, Linux 5.14+


def _own_netns_cookie() -> int | None:
    """The network namespace cookie of this process (None before Linux 5.14)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
        except OSError:
            return None


def _listening_inodes(proc: str) -> dict[int, int]:
    """Socket inode -> local port of every listening TCP socket (IPv4 and IPv6) in /proc/net."""
    out: dict[int, int] = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{proc}/net/{name}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A":  # TCP_LISTEN
                        out[int(fields[9])] = int(fields[1].rsplit(":", 1)[1], 16)
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return out


def _listener_of(proc: str, pid: int, cgroup_root: str) -> bytes | None:
    """The ``tool_listener`` value for process ``pid``, as the kernel fills it at bind."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"{proc}/{pid}/status") as f:
            status = {k: v.split() for k, _, v in (line.partition(":") for line in f)}
        with open(f"{proc}/{pid}/cgroup") as f:
            cgroup_path = next((line.split(":", 2)[2].strip() for line in f if line.startswith("0::")), "/")
        exe = os.stat(f"{proc}/{pid}/exe")
        comm = stat[stat.index(b"(") + 1 : stat.rindex(b")")][:15]
        cgroup_id = os.stat(os.path.join(cgroup_root, cgroup_path.lstrip("/"))).st_ino
    except (OSError, ValueError, KeyError):
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    exec_id = int(fields[19]) * (1_000_000_000 // os.sysconf("SC_CLK_TCK"))
    uid, gid = int(status["Uid"][0]), int(status["Gid"][0])  # real ids, as bpf_get_current_uid_gid()
    task = _TASK.pack(pid, pid, int(fields[1]), uid, gid, 0, exec_id, cgroup_id, comm)
    return _LISTENER.pack(task, exe.st_ino, abi.kernel_dev(exe.st_dev), 0)


class Sensors:
    """The loaded sensors object and its links.

    Use :meth:`load`; close with :meth:`close` or as a context manager.
    """

    # Minimum time between two slot flips, so that no program still reads a slot being rewritten.
    SWAP_GUARD_S = 0.05
    # How long a slot's replaced trie is kept before its last reference is closed (_install_trie).
    RETIRE_S = 2.0

    def __init__(self, obj: BpfObject, cgroup_path: str) -> None:
        self.obj = obj
        self.cgroup_path = cgroup_path
        self.links: dict[str, Link] = {}
        self.missing: dict[str, str] = {}  # program -> why it is not attached
        self._cgroup_fd = -1
        self._slots = [_SlotContents(), _SlotContents()]
        self._active = 0
        self._generation = 0
        self._last_flip = 0.0
        self._bench = False
        self._tries: list[Map | None] = [None, None]  # each slot's LPM trie, in rule_nodes
        self._retiring: list[tuple[threading.Timer, Map]] = []  # replaced tries, closed a little later
        self.maps = {
            name: obj.map(name)
            for name in (
                "events",
                "config",
                "counters",
                "sequence",
                "tasks",
                "slot_cfg",
                "who_exe",
                "who_uid",
                "who_gid",
                "who_cgroup",
                "who_comm",
                "rule_nodes",
                "rules",
                "flows",
                "listeners",
            )
        }

    @classmethod
    def load(
        cls,
        cgroup_path: str | None = None,
        *,
        object_path: Path = OBJECT_PATH,
        ringbuf_bytes: int = 8 << 20,
        mode: str = "detect",
        flow_interval_ms: int = 1000,
        scope_tracepoints: bool | None = None,
        bench_tgid: int = 0,
        bench_burst: int = 256,
    ) -> Sensors:
        """Open, load and attach the sensors.

        Args:
            cgroup_path: cgroup v2 directory to attach to (default: the hierarchy's root, the whole host).
            object_path: the compiled object.
            ringbuf_bytes: ring buffer size (a power of two, multiple of the page size).
            mode: "detect" or "prevent".
            flow_interval_ms: repeats of one flow within this window fold into counters (0: every decision is an event).
            scope_tracepoints: limit exec/exit/packet-socket tracking to the cgroup (default: when it is not the root).
            bench_tgid: benchmarks only: each getppid() of this process emits ``bench_burst`` synthetic records.
            bench_burst: records per getppid() of the benchmark producer.

        Returns:
            The attached sensors.

        Raises:
            errors.BpfError: what is missing on this host and what to do.
        """
        root = cg.cgroup2_root()
        path = os.path.realpath(cgroup_path or root)
        if not os.path.isdir(path):
            raise errors.NotFound(f"cgroup {path}", 2, "pass --cgroup a directory of the cgroup v2 hierarchy")
        if not os.path.exists("/sys/kernel/btf/vmlinux"):
            raise errors.NoBTF(
                "kernel BTF", 2, "this kernel was built without CONFIG_DEBUG_INFO_BTF; use a kernel with BTF"
            )
        bpffs.ensure_mounted()
        tracefs_ok = True
        try:
            bpffs.ensure_tracefs()
        except errors.BpfError as exc:
            tracefs_ok = False
            log.warning("tracefs_unavailable", error=str(exc))
        missing: dict[str, str] = {}
        if not tracefs_ok or not os.path.exists("/sys/kernel/tracing/events/syscalls/sys_enter_socket"):
            missing["tool_packet_socket"] = "no tracefs syscall tracepoints: AF_PACKET sockets are not seen"
        scoped = (path != os.path.realpath(root)) if scope_tracepoints is None else scope_tracepoints
        knobs = _fast_path_knobs()
        # An older kernel may refuse an optional program (a helper it lacks): load again
        # without it and say what is lost, rather than refusing to start.
        for _attempt in range(len(CGROUP_PROGRAMS) + len(TRACE_PROGRAMS)):
            obj = BpfObject.open(object_path)
            try:
                obj.map("events").set_max_entries(ringbuf_bytes)
                if scoped:
                    rel = os.path.relpath(path, root)
                    level = len([p for p in rel.split("/") if p and p != "."])
                    obj.set_rodata("scope_cgroup_id", _U64.pack(cg.cgroup_id(path)))
                    obj.set_rodata("scope_cgroup_level", _U32.pack(level))
                for name in missing:
                    obj.program(name).set_autoload(False)
                for knob, enabled in knobs.items():
                    if enabled and obj.has_rodata(knob):  # an older build (--object) may lack a knob
                        obj.set_rodata(knob, _U32.pack(1))
                if bench_tgid:
                    obj.set_rodata("bench_tgid", _U32.pack(bench_tgid))
                    obj.set_rodata("bench_burst", _U32.pack(bench_burst))
                    obj.program("tool_bench_producer").set_autoload(True)
                obj.load()
                break
            except errors.VerifierError as exc:
                obj.close()
                rejected = _rejected_program(exc.log)
                if rejected is None or rejected in _REQUIRED or rejected in missing:
                    raise
                what = CGROUP_PROGRAMS.get(rejected) or TRACE_PROGRAMS.get(rejected, rejected)
                missing[rejected] = f"{what}: this kernel refused the program ({exc.tail.splitlines()[-1:]})"
                log.warning("sensor_refused_by_kernel", program=rejected, what=what)
            except BaseException:
                obj.close()
                raise
        self = cls(obj, path)
        self.missing.update(missing)
        self._bench = bool(bench_tgid)
        try:
            self._configure(mode, flow_interval_ms)
            self._attach()
        except BaseException:
            self.close()
            raise
        return self

    def _configure(self, mode: str, flow_interval_ms: int) -> None:
        if self.maps["rule_nodes"].type != BPF_MAP_TYPE_ARRAY_OF_MAPS:
            raise errors.BpfError(
                f"sensors object {self.obj.name!r}: rule_nodes is not an array of per-slot tries (an older build)",
                advice="use the object this package ships, or rebuild it from this checkout with `make -C bpf`",
            )
        for slot in (0, 1):
            self._install_trie(slot, _new_trie(slot))  # closes the new trie if it cannot install it
        cfg = self.maps["config"]
        cfg.update(_U32.pack(abi.CFG_ACTIVE_SLOT), _U32.pack(0))
        cfg.update(_U32.pack(abi.CFG_FLOW_INTERVAL_MS), _U32.pack(flow_interval_ms))
        self.set_mode(mode)

    def _attach(self) -> None:
        self._cgroup_fd = os.open(self.cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
        for name, what in CGROUP_PROGRAMS.items():
            if name in self.missing:
                continue
            try:
                self.links[name] = self.obj.program(name).attach_cgroup(self._cgroup_fd)
            except errors.BpfError as exc:
                if name in _REQUIRED:
                    raise
                self.missing[name] = f"{what}: {exc}"
                log.warning("sensor_missing", program=name, what=what, error=str(exc))
        if self._bench:
            self.links["tool_bench_producer"] = self.obj.program("tool_bench_producer").attach()
        for name, what in TRACE_PROGRAMS.items():
            if name in self.missing:
                continue
            try:
                self.links[name] = self.obj.program(name).attach()
            except errors.BpfError as exc:
                self.missing[name] = f"{what}: {exc}"
                log.warning("sensor_missing", program=name, what=what, error=str(exc))

    # ---- runtime knobs ----

    def set_mode(self, mode: str) -> None:
        """Switch between detect and prevent without reloading anything."""
        value = {"detect": abi.MODE_DETECT, "prevent": abi.MODE_PREVENT}.get(mode)
        if value is None:
            raise ValueError(f"mode must be 'detect' or 'prevent', not {mode!r}")
        self.maps["config"].update(_U32.pack(abi.CFG_MODE), _U32.pack(value))
        self.mode = mode

    def counters(self) -> dict[str, int]:
        """Kernel counters summed over CPUs (events, folded, ring_buffer_full, ...)."""
        out: dict[str, int] = {}
        m = self.maps["counters"]
        for i, name in enumerate(abi.COUNTERS):
            per_cpu = [_U64.unpack_from(v)[0] for v in (m.lookup_percpu(_U32.pack(i)) or [])]
            out[name] = max(per_cpu, default=0) if name == "ring_buffer_avail_bytes" else sum(per_cpu)
        return out

    def ring_buffer_fill(self) -> float:
        """How full the ring buffer was at the last event, 0..1 (a backlog the pipeline has not drained)."""
        size = self.maps["events"].max_entries
        return min(1.0, self.counters()["ring_buffer_avail_bytes"] / size) if size else 0.0

    @property
    def generation(self) -> int:
        return self._generation

    # ---- process identity ----

    def seed_tasks(self, proc: str = "/proc") -> int:
        """Record the executable of processes that started before the sensors (only where absent).

        Returns:
            How many processes were added.
        """
        tasks = self.maps["tasks"]
        added = 0
        for entry in os.scandir(proc):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                st = os.stat(f"{proc}/{pid}/exe")
                with open(f"{proc}/{pid}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2 :].split()
            ppid = int(fields[1])
            start_ticks = int(fields[19])
            exec_id = start_ticks * (1_000_000_000 // os.sysconf("SC_CLK_TCK"))
            value = _TASK_INFO.pack(exec_id, st.st_ino, abi.kernel_dev(st.st_dev), ppid)
            try:
                tasks.update(_U32.pack(pid), value, flags=1)  # BPF_NOEXIST: exec events win
                added += 1
            except errors.BpfError:
                pass
        return added

    def seed_listeners(self, proc: str = "/proc") -> int:
        """Record the owners of TCP listeners that were bound before the sensors (only where absent).

        Inbound connections are attributed to whoever bound the listening socket, which the
        kernel learns at bind time; a service started before the agent would otherwise show
        no process. This reads ``/proc/net/tcp{,6}`` and the processes' socket fds, for
        sockets in the agent's own network namespace (others are left to their next bind).

        Returns:
            How many listeners were added.
        """
        netns_cookie = _own_netns_cookie()
        if netns_cookie is None:
            return 0
        ports = _listening_inodes(proc)  # socket inode -> port
        if not ports:
            return 0
        root = cg.cgroup2_root()
        own_netns = os.stat(f"{proc}/self/ns/net").st_ino
        listeners = self.maps["listeners"]
        added = 0
        seen: set[int] = set()
        for entry in os.scandir(proc):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                if os.stat(f"{proc}/{pid}/ns/net").st_ino != own_netns:
                    continue
                fds = os.listdir(f"{proc}/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    link = os.readlink(f"{proc}/{pid}/fd/{fd}")
                except OSError:
                    continue
                if not link.startswith("socket:["):
                    continue
                inode = int(link[8:-1])
                port = ports.get(inode)
                if port is None or port in seen:
                    continue
                value = _listener_of(proc, pid, root)
                if value is None:
                    continue
                key = _LISTENER_KEY.pack(netns_cookie, port, socket.IPPROTO_TCP, 1, 0)
                try:
                    listeners.update(key, value, flags=1)  # BPF_NOEXIST: a bind seen by the kernel wins
                    added += 1
                except errors.BpfError:
                    pass
                seen.add(port)
        return added

    # ---- policy ----

    def apply_policy(self, tables: KernelTables) -> int:
        """Write a policy into the inactive slot and make it the active one atomically.

        Args:
            tables: from :func:`build_tables`.

        Returns:
            The new policy generation (reported in events).

        Raises:
            TablesError: the policy does not fit the maps (the running policy stays in force).
        """
        if tables.rule_entries > abi.SLOT_RULES:
            raise TablesError(f"policy needs {tables.rule_entries} kernel rule entries; at most {abi.SLOT_RULES}")
        wait = self._last_flip + self.SWAP_GUARD_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        slot = 1 - self._active
        self._clear_slot(slot)
        contents = self._slots[slot]

        # Subjects. Each slot's keys are recorded before the write, so that a failed write
        # still leaves them to be cleared (deleting an absent key is harmless).
        subjects: list[tuple[str, list[bytes], list[bytes]]] = [
            ("who_exe", contents.exe, [_EXE_KEY.pack(slot, dev, ino) for dev, ino in tables.exe]),
            ("who_uid", contents.uid, [_ID_KEY.pack(slot, uid) for uid in tables.uid]),
            ("who_gid", contents.gid, [_ID_KEY.pack(slot, gid) for gid in tables.gid]),
            ("who_cgroup", contents.cgroup, [_CGROUP_KEY.pack(slot, 0, cid) for cid in tables.cgroup]),
            ("who_comm", contents.comm, [_COMM_KEY.pack(slot, comm) for comm in tables.comm]),
        ]
        masks: tuple[dict[Any, int], ...] = (tables.exe, tables.uid, tables.gid, tables.cgroup, tables.comm)
        for (name, recorded, keys), by_key in zip(subjects, masks, strict=True):
            recorded.extend(keys)
            self.maps[name].update_batch(keys, [_U64.pack(mask) for mask in by_key.values()])

        self._write_rules(slot, tables)

        self._generation += 1
        cfg = _SLOT_CFG.pack(*tables.wildcard, self._generation, tables.defaults, tables.dims_used)
        self.maps["slot_cfg"].update(_U32.pack(slot), cfg)
        # The flip: one u32 that every program reads once per decision.
        self.maps["config"].update(_U32.pack(abi.CFG_ACTIVE_SLOT), _U32.pack(slot))
        self._active = slot
        self._last_flip = time.monotonic()
        return self._generation

    def slot_trie(self, slot: int) -> Map:
        """The LPM trie that ``slot``'s decisions look their nodes up in: the one ``rule_nodes[slot]`` holds."""
        trie = self._tries[slot]
        if trie is None:
            raise ValueError("the sensors are closed")
        return trie

    def _install_trie(self, slot: int, trie: Map) -> None:
        """Make ``trie`` (owned by the call from now on) the LPM trie of the inactive ``slot``.

        The replaced trie's last reference is closed :data:`RETIRE_S` later, not now: kernels before
        6.8 free an inner map as soon as its last reference goes, without waiting for programs
        that may still hold it. None should (the slot has been inactive for at least
        ``SWAP_GUARD_S``), and the delay makes that a matter of seconds, not of microseconds.
        """
        try:
            self.maps["rule_nodes"].update(_U32.pack(slot), _U32.pack(trie.fd))
        except BaseException:
            trie.close()
            raise
        old, self._tries[slot] = self._tries[slot], trie
        if old is not None:
            self._retire(old)

    def _retire(self, trie: Map) -> None:
        timer = threading.Timer(self.RETIRE_S, trie.close)
        timer.daemon = True
        self._retiring = [(t, m) for t, m in self._retiring if t.is_alive()]
        self._retiring.append((timer, trie))
        timer.start()

    def _write_rules(self, slot: int, tables: KernelTables) -> None:
        """Write the rules and the LPM nodes that point at them into ``slot``, changing only what differs.

        The slot is inactive, so its old entries can be rewritten in any order: LPM entries the new
        policy does not have are deleted, new or changed ones written, identical ones left alone.
        When that would take more trie operations than the new policy has nodes (a policy that
        changes most addresses), the nodes go into a fresh trie instead, which then replaces the
        slot's: the kernel frees the old trie in the background, so a swap never waits for 100k
        deletes. Nodes go to the kernel in key order, which its trie handles faster.
        """
        contents = self._slots[slot]
        rules = tables.rules
        first = slot * abi.SLOT_RULES
        same_lpm = tables.lpm_keys == contents.lpm_keys and tables.lpm_values == contents.lpm_values
        helper = native.get()
        new_nodes = len(tables.lpm_keys) // _LPM_KEY.size
        trie = self.slot_trie(slot)
        plan = None if same_lpm else _plan_lpm_writes(contents, tables, helper)
        try:
            if rules != contents.rules and rules:
                indexes = array("I", range(first, first + len(rules) // _RULE_PADDED.size))
                self.maps["rules"].update_packed(indexes.tobytes(), rules)
            if plan is None:
                pass
            elif plan.writes > new_nodes:
                fresh = _new_trie(slot)
                try:
                    _write_lpm(fresh, _fill_plan(plan), tables, slot, helper)
                except BaseException:
                    fresh.close()
                    raise
                self._install_trie(slot, fresh)
            else:
                _write_lpm(trie, plan, tables, slot, helper)
        except BaseException:
            contents.rules = None
            if plan is not None and 0 < plan.writes <= new_nodes:
                # The slot's trie may now hold any of the old and new entries, with any value:
                # record that, so that the next write into it mends whatever this one left.
                # (A fresh trie that failed was dropped: the slot's own is as it was.)
                maybe = dict.fromkeys(contents.lpm_entries(), _UNKNOWN_LPM_VALUE)
                maybe.update(dict.fromkeys(_split_keys(tables.lpm_keys), _UNKNOWN_LPM_VALUE))
                contents.lpm, contents.lpm_keys, contents.lpm_values = maybe, None, None
            raise
        contents.lpm = None if plan is None or plan.new is None else plan.new
        contents.lpm_keys, contents.lpm_values, contents.rules = tables.lpm_keys, tables.lpm_values, rules

    def _clear_slot(self, slot: int) -> None:
        """Mark ``slot`` empty and remove its subjects; :meth:`_write_rules` then brings its nodes and rules over."""
        c = self._slots[slot]
        # Mark the slot empty first (generation 0: programs ignore it).
        self.maps["slot_cfg"].update(_U32.pack(slot), bytes(abi.SLOT_CFG.size))
        for name, keys in (
            ("who_exe", c.exe),
            ("who_uid", c.uid),
            ("who_gid", c.gid),
            ("who_cgroup", c.cgroup),
            ("who_comm", c.comm),
        ):
            self.maps[name].delete_batch(keys)
        self._slots[slot] = _SlotContents(c.lpm, c.lpm_keys, c.lpm_values, c.rules)

    # ---- lifetime ----

    def close(self) -> None:
        """Detach everything and free the object (idempotent)."""
        for link in self.links.values():
            link.close()
        self.links.clear()
        if self._cgroup_fd >= 0:
            os.close(self._cgroup_fd)
            self._cgroup_fd = -1
        for timer, retired in self._retiring:  # the programs are detached: nothing reads them now
            timer.cancel()
            retired.close()
        for trie in self._tries:
            if trie is not None:
                trie.close()
        self._retiring, self._tries = [], [None, None]
        self.obj.close()

    def __enter__(self) -> Sensors:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
