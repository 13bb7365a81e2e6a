"""The product's kernel sensors: load sensors.bpf.o, attach every hook, program the policy maps.

The policy lives in two slots of every policy map. :meth:`Sensors.apply_policy`
writes the inactive slot, then flips one u32 (``config[ACTIVE_SLOT]``) that
every program reads once per decision: a decision is taken wholly by the old
policy or wholly by the new one, never by neither.
"""

from __future__ import annotations

import gc
import glob
import ipaddress
import os
import struct
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import structlog

from loaders import abi, bpffs, errors
from loaders import cgroup as cg
from loaders.links import Link
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


@dataclass
class Node:
    """An LPM node: the rules whose address is exactly this prefix."""

    direction: int
    protocol: int
    network: ipaddress.IPv6Network
    rules: list[tuple[int, int, int, int, int]] = field(default_factory=list)  # who, lo, hi, action, rule_id
    parent_len: int = 0  # key bits of the nearest enclosing node, 0 = none


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
    nodes: list[Node] = field(default_factory=list)
    defaults: bytes = bytes(8)
    unresolved: list[str] = field(default_factory=list)  # exe/cgroup selectors that matched nothing here

    @property
    def rule_entries(self) -> int:
        return sum(len(n.rules) for n in self.nodes)


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


def _resolve_cgroups(patterns: Iterable[str], root: str, unresolved: list[str]) -> set[int]:
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
        if not found:
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
    with _paused_gc():
        return _build_tables(policy, cgroup_root)


@contextmanager
def _paused_gc() -> Iterator[None]:
    """Pause the cyclic collector: its full passes over 100k fresh nodes cost more than building them."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


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
                target, keys = t.cgroup, _resolve_cgroups(values, cgroup_root, t.unresolved)
            else:
                target, keys = t.comm, [_comm_key(c) for c in values]
            for k in keys:
                target[k] = target.get(k, 0) | bit  # type: ignore[index, arg-type]
    # A dimension nobody conditions on must not filter anyone out.
    for dim in range(5):
        if not t.dims_used & (1 << dim):
            t.wildcard[dim] = ~0 & 0xFFFFFFFFFFFFFFFF

    # Grouped by plain ints: hashing IPv6Network objects costs more than building the whole key.
    groups: dict[tuple[int, int, int, int], Node] = {}
    directions = abi.DIRECTIONS
    for e in policy.entries:
        direction = directions[e.direction]
        net = e.network
        key = (direction, int(e.protocol), int(net.network_address), net.prefixlen)
        node = groups.get(key)
        if node is None:
            node = groups[key] = Node(direction, int(e.protocol), net)
        lo, hi = e.port_lo, e.port_hi
        if direction == abi.DIR_RAW:
            # A raw rule has no port or protocol (docs/policy.md): the kernel passes the socket's
            # protocol as the port (an ethertype for AF_PACKET, up to 65535), so cover all of it.
            lo, hi = 0, 0xFFFF
        node.rules.append((1 << e.who_class, lo, hi, abi.ACTIONS[e.action], e.rule_id))
    for node in groups.values():
        if len(node.rules) > 1:
            node.rules.sort(key=lambda r: r[4])
        if len(node.rules) > abi.MAX_NODE_RULES:
            raise TablesError(
                f"{len(node.rules)} rules share the destination {node.network} ({_dir_name(node.direction)}, "
                f"protocol {node.protocol}); the kernel evaluates at most {abi.MAX_NODE_RULES} per address "
                "prefix: merge rules (list several ports or users in one rule)"
            )
    _link_parents(groups.values())
    t.nodes = list(groups.values())

    defaults = bytearray(8)
    for mode_index, mode in enumerate(("detect", "prevent")):
        per_dir = policy.defaults.get(mode, {})
        for name, direction in abi.DIRECTIONS.items():
            action = per_dir.get(name, "allow")
            defaults[mode_index * abi.DIR_MAX + direction - 1] = abi.ACTIONS[action]
    t.defaults = bytes(defaults)
    return t


def _rejected_program(libbpf_log: str) -> str | None:
    """Name of the program the verifier refused, from libbpf's log."""
    for line in reversed(libbpf_log.splitlines()):
        if "libbpf: prog '" in line and ("load failed" in line or "failed to load" in line):
            return line.split("prog '", 1)[1].split("'", 1)[0]
    return None


def _dir_name(direction: int) -> str:
    return {v: k for k, v in abi.DIRECTIONS.items()}[direction]


def _link_parents(nodes: Iterable[Node]) -> None:
    """Set each node's parent_len to its nearest enclosing node of the same direction/protocol."""
    all_ones = (1 << 128) - 1
    masks = [all_ones ^ ((1 << (128 - plen)) - 1) if plen else 0 for plen in range(129)]
    by_group: dict[tuple[int, int], dict[tuple[int, int], Node]] = defaultdict(dict)
    for n in nodes:
        by_group[(n.direction, n.protocol)][(n.network.prefixlen, int(n.network.network_address))] = n
    for members in by_group.values():
        lengths = sorted({plen for plen, _ in members}, reverse=True)
        parent_of: dict[tuple[int, int], tuple[int, int]] = {}
        for plen, addr in members:
            for candidate in lengths:
                if candidate >= plen:
                    continue
                parent_key = (candidate, addr & masks[candidate])
                if parent_key in members:
                    parent_of[(plen, addr)] = parent_key
                    members[(plen, addr)].parent_len = abi.LPM_KEY_BITS + candidate
                    break
        # Nesting depth: walk each chain up to its root (parent_of holds only nested nodes).
        for start in parent_of:
            depth = 0
            cur: tuple[int, int] | None = start
            while cur is not None and cur in parent_of:
                depth += 1
                if depth >= abi.MAX_NESTING:
                    raise TablesError(
                        f"address {members[start].network} is nested in more than {abi.MAX_NESTING} other "
                        f"prefixes of the policy; the kernel walks at most {abi.MAX_NESTING}"
                    )
                cur = parent_of[cur]


@dataclass
class _SlotContents:
    """Keys written into one slot, so the slot can be emptied before it is reused."""

    lpm: list[bytes] = field(default_factory=list)
    exe: list[bytes] = field(default_factory=list)
    uid: list[bytes] = field(default_factory=list)
    gid: list[bytes] = field(default_factory=list)
    cgroup: list[bytes] = field(default_factory=list)
    comm: list[bytes] = field(default_factory=list)


class Sensors:
    """The loaded sensors object and its links.

    Use :meth:`load`; close with :meth:`close` or as a context manager.
    """

    # Minimum time between two slot flips, so that no program still reads a slot being rewritten.
    SWAP_GUARD_S = 0.05

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
            raise TablesError(
                f"policy needs {tables.rule_entries} kernel rule entries; at most {abi.SLOT_RULES}"
            )
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

        # Rules, then the nodes that point at them: every key and value packed in one pass.
        pack_key, pack_value, pack_rule = _LPM_KEY.pack, _LPM_VALUE.pack, _RULE.pack
        key_bits = abi.LPM_KEY_BITS
        rule_values: list[bytes] = []
        node_keys: list[bytes] = []
        node_values: list[bytes] = []
        nxt = slot * abi.SLOT_RULES
        for node in tables.nodes:
            net = node.network
            node_keys.append(
                pack_key(
                    key_bits + net.prefixlen,
                    slot,
                    node.direction,
                    node.protocol,
                    0,
                    int(net.network_address).to_bytes(16, "big"),
                )
            )
            node_values.append(pack_value(nxt, len(node.rules), node.parent_len))
            for who, lo, hi, action, rule_id in node.rules:
                rule_values.append(pack_rule(who, lo, hi, action, b"\0\0\0", rule_id, 0))
            nxt += len(node.rules)
        if rule_values:
            first = slot * abi.SLOT_RULES
            rule_keys = [_U32.pack(i) for i in range(first, first + len(rule_values))]
            self.maps["rules"].update_batch(rule_keys, rule_values)
        contents.lpm.extend(node_keys)
        # LPM tries have no batch update: update_batch falls back to one tight syscall loop.
        self.maps["rule_nodes"].update_batch(node_keys, node_values)

        self._generation += 1
        cfg = _SLOT_CFG.pack(*tables.wildcard, self._generation, tables.defaults, tables.dims_used)
        self.maps["slot_cfg"].update(_U32.pack(slot), cfg)
        # The flip: one u32 that every program reads once per decision.
        self.maps["config"].update(_U32.pack(abi.CFG_ACTIVE_SLOT), _U32.pack(slot))
        self._active = slot
        self._last_flip = time.monotonic()
        return self._generation

    def _clear_slot(self, slot: int) -> None:
        c = self._slots[slot]
        # Mark the slot empty first (generation 0: programs ignore it).
        self.maps["slot_cfg"].update(_U32.pack(slot), bytes(abi.SLOT_CFG.size))
        for name, keys in (
            ("rule_nodes", c.lpm),
            ("who_exe", c.exe),
            ("who_uid", c.uid),
            ("who_gid", c.gid),
            ("who_cgroup", c.cgroup),
            ("who_comm", c.comm),
        ):
            self.maps[name].delete_batch(keys)
        self._slots[slot] = _SlotContents()

    # ---- lifetime ----

    def close(self) -> None:
        """Detach everything and free the object (idempotent)."""
        for link in self.links.values():
            link.close()
        self.links.clear()
        if self._cgroup_fd >= 0:
            os.close(self._cgroup_fd)
            self._cgroup_fd = -1
        self.obj.close()

    def __enter__(self) -> Sensors:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
