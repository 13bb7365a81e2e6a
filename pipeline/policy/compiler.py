"""Compile loaded policy documents into the flat tables the kernel maps are built from.

The compiled form is what both the kernel and the reference evaluator (:mod:`.evaluate`) run:
who-classes (process conditions, one bit each) and entries keyed by
(direction, protocol, network, port range) that point at a rule and a who-class.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, compress, pairwise, repeat
from operator import is_not, ne
from typing import Literal, NamedTuple, cast, overload

import msgspec

from loaders import abi
from pipeline.policy.addresses import ANY_NETWORK, ParsedAddress, display_network
from pipeline.policy.diagnostics import Diagnostic, PolicyError
from pipeline.policy.loader import ADDRESS_FIELD, LoadedPolicy, rule_addresses
from pipeline.policy.model import AGENT_MODES, BUILTIN_DEFAULTS, DIRECTIONS, Action, Rule, Who
from pipeline.policy.ports import merge_ranges, parse_port
from pipeline.policy.yamlpos import paused_gc

KernelAction = Literal["allow", "alert", "deny-audit", "deny"]
ACTION_RANK: dict[str, int] = {"allow": 0, "alert": 1, "deny-audit": 2, "deny": 3}
"""Precedence among matching rules: the highest rank wins."""
PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17}
_ANY_ADDRESS = ParsedAddress(ANY_NETWORK, None, 0, 0)
MAX_WHO_CLASSES = 64
MAX_RULES_PER_KEY = 64


@dataclass(frozen=True, slots=True)
class WhoClass:
    """A set of process conditions; its ``id`` is its bit in the kernel's who-mask.

    ``None`` on a dimension means no condition; a list means "any of these" (an empty list matches
    no process, e.g. when every user named does not exist on this host). Dimensions combine with AND.
    ``exe`` and ``cgroup`` items are globs (``*``, ``?`` within a segment, ``**`` across segments);
    ``cgroup`` paths are relative to the cgroup2 root.
    """

    id: int
    exe: list[str] | None = None
    comm: list[str] | None = None
    uid: list[int] | None = None
    gid: list[int] | None = None
    cgroup: list[str] | None = None

    def key(self) -> tuple[object, ...]:
        """The conditions alone, for deduplication."""
        return tuple(None if v is None else tuple(v) for v in (self.exe, self.comm, self.uid, self.gid, self.cgroup))

    def is_anyone(self) -> bool:
        """Return whether the class places no condition at all."""
        return all(v is None for v in (self.exe, self.comm, self.uid, self.gid, self.cgroup))


class KernelRule(NamedTuple):
    """One entry of the kernel's rule table (IPv4 is carried v4-mapped in ``network``).

    A named tuple rather than a dataclass: a 100k-rule policy makes one per entry, and the kernel
    table builder unpacks them.
    """

    rule_id: int
    who_class: int
    direction: str
    protocol: int
    network: ipaddress.IPv6Network
    port_lo: int
    port_hi: int
    action: KernelAction


@dataclass(frozen=True, slots=True)
class RuleInfo:
    """What user space needs to report a rule: its name, where it was written and what it means."""

    name: str
    description: str
    source: str
    action: KernelAction
    audit: bool
    explanation: str
    direction: str = "egress"
    dns_names: list[str] = field(default_factory=list)


class RuleTable(Mapping[int, RuleInfo]):
    """rule_id -> :class:`RuleInfo`, each made when it is first asked for.

    Describing a rule in words costs more than compiling it, and a running agent reports only the
    rules that match, so the compiler keeps each document's rules (with their lines and kernel
    actions) and describes a rule on demand.
    """

    __slots__ = ("_count", "_dns", "_made", "_parts")

    def __init__(self) -> None:
        self._parts: list[tuple[int, list[Rule], str, list[int], list[KernelAction]]] = []
        self._dns: dict[int, list[str]] = {}  # rule_id -> DNS names, for rules that have any
        self._made: dict[int, RuleInfo] = {}
        self._count = 0

    def add(self, rules: list[Rule], file: str, lines: list[int], actions: list[KernelAction]) -> None:
        """Append one document's rules (ids follow the previous ones); ``lines`` 0 means unknown."""
        self._parts.append((self._count + 1, rules, file, lines, actions))
        self._count += len(rules)

    def set_dns_names(self, rule_id: int, names: list[str]) -> None:
        """Record the DNS names a rule lists (not enforced yet)."""
        self._dns[rule_id] = names

    def __getitem__(self, rule_id: int) -> RuleInfo:
        info = self._made.get(rule_id)
        if info is not None:
            return info
        if not isinstance(rule_id, int) or not 1 <= rule_id <= self._count:
            raise KeyError(rule_id)
        first, rules, file, lines, actions = next(p for p in reversed(self._parts) if p[0] <= rule_id)
        rule, line, action = rules[rule_id - first], lines[rule_id - first], actions[rule_id - first]
        info = RuleInfo(
            name=rule.name,
            description=rule.description if isinstance(rule.description, str) else "",
            source=f"{file}:{line}" if line else file,
            action=action,
            audit=action == "deny-audit",
            explanation=describe_rule(rule),
            direction=rule.direction,
            dns_names=list(self._dns.get(rule_id, ())),
        )
        self._made[rule_id] = info
        return info

    def __iter__(self) -> Iterator[int]:
        return iter(range(1, self._count + 1))

    def __len__(self) -> int:
        return self._count

    def __contains__(self, rule_id: object) -> bool:
        return isinstance(rule_id, int) and 1 <= rule_id <= self._count


# One rule as the compiler resolved it: (rule_id, who_class, direction, protocols, networks, port
# ranges, action); its entries are every (protocol, network, port range). A plain tuple: a named
# tuple's constructor cost a third of compiling a 100k-rule policy.
_RuleRow = tuple[int, int, str, Sequence[int], Sequence[ParsedAddress], Sequence[tuple[int, int]], KernelAction]


class CompiledEntries(Sequence[KernelRule]):
    """The compiled policy's kernel entries, in rule order, each made when the list is first read.

    Compiling a reload only needs the entries grouped as the kernel's LPM nodes (``kernel_nodes``,
    made in the same pass); the :class:`KernelRule` objects are for the reference evaluator, the
    policy diff and tests, and making 100k of them cost about a third of compiling. Entries put
    together by other code (a plain list) carry no ``kernel_nodes``: the table builder groups
    those itself.
    """

    __slots__ = ("_made", "_rows", "kernel_nodes")

    def __init__(self, rows: list[_RuleRow], kernel_nodes: dict[int, bytes]) -> None:
        self._rows = rows
        self._made: list[KernelRule] | None = None
        self.kernel_nodes = kernel_nodes
        """Node key -> the node's rules packed as ``tool_rule``s, in rule order (see :func:`node_key`)."""

    def _entries(self) -> list[KernelRule]:
        if self._made is None:
            self._made = [
                KernelRule(rule_id, who_class, direction, proto, address.network, low, high, action)
                for rule_id, who_class, direction, protocols, networks, ports, action in self._rows
                for proto in protocols
                for address in networks
                if address.network is not None
                for low, high in ports
            ]
        return self._made

    @overload
    def __getitem__(self, index: int) -> KernelRule: ...

    @overload
    def __getitem__(self, index: slice) -> list[KernelRule]: ...

    def __getitem__(self, index: int | slice) -> KernelRule | list[KernelRule]:
        return self._entries()[index]

    def __len__(self) -> int:
        return len(self._entries())

    def __iter__(self) -> Iterator[KernelRule]:
        return iter(self._entries())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CompiledEntries):
            other = other._entries()
        return isinstance(other, list) and self._entries() == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"CompiledEntries({self._entries()!r})"


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """The whole policy, flattened. ``rules`` maps rule_id (from 1, in merge order) to its info."""

    who_classes: list[WhoClass]
    entries: Sequence[KernelRule]
    defaults: dict[str, dict[str, str]]
    rules: Mapping[int, RuleInfo]
    warnings: list[str]
    sources: list[str]

    def rule_id(self, name: str) -> int:
        """Return the id of the rule called ``name`` (0 when there is none)."""
        return next((rid for rid, info in self.rules.items() if info.name == name), 0)


def _resolve(names: list[int | str], lookup: str, where: str, warnings: list[str]) -> list[int]:
    ids: list[int] = []
    for item in names:
        if isinstance(item, int):
            ids.append(item)
            continue
        try:
            ids.append(pwd.getpwnam(item).pw_uid if lookup == "user" else grp.getgrnam(item).gr_gid)
        except KeyError:
            warnings.append(f"{where}: {lookup} '{item}' does not exist on this host; it matches no process here")
    return sorted(set(ids))


def who_conditions(who: Who | msgspec.UnsetType, where: str, warnings: list[str]) -> WhoClass:
    """Normalise a rule's ``who`` into a :class:`WhoClass` (with id -1, assigned later)."""
    if isinstance(who, msgspec.UnsetType):
        return WhoClass(-1)

    def listed(value: list[str] | msgspec.UnsetType) -> list[str] | None:
        return None if isinstance(value, msgspec.UnsetType) else sorted(set(value))

    cgroups: list[str] | None = None
    if not all(isinstance(v, msgspec.UnsetType) for v in (who.cgroup, who.unit, who.container)):
        items = [c.lstrip("/") or "" for c in (who.cgroup or [])]
        items += [f"**/{unit}" for unit in (who.unit or [])]
        items += [f"**/*{cid}*" for cid in (who.container or [])]
        cgroups = sorted(set(items))
    return WhoClass(
        -1,
        exe=listed(who.exe),
        comm=listed(who.comm),
        uid=None if isinstance(who.user, msgspec.UnsetType) else _resolve(who.user, "user", where, warnings),
        gid=None if isinstance(who.group, msgspec.UnsetType) else _resolve(who.group, "group", where, warnings),
        cgroup=cgroups,
    )


def describe_who(who: Who | msgspec.UnsetType) -> str:
    """Say which processes ``who`` selects, in words."""
    if isinstance(who, msgspec.UnsetType) or who == Who():
        return "any process"
    if (
        who.exe
        and len(who.exe) == 1
        and "*" not in who.exe[0]
        and all(
            isinstance(v, msgspec.UnsetType)
            for v in (who.comm, who.user, who.group, who.cgroup, who.unit, who.container)
        )
    ):
        return f"{os.path.basename(who.exe[0])} ({who.exe[0]})"
    parts: list[str] = []
    for label, values in (
        ("exe", who.exe),
        ("comm", who.comm),
        ("user", who.user),
        ("group", who.group),
        ("cgroup", who.cgroup),
        ("unit", who.unit),
        ("container", who.container),
    ):
        if not isinstance(values, msgspec.UnsetType):
            parts.append(f"{label} {' or '.join(map(str, values))}")
    return "processes with " + " and ".join(parts)


def describe_rule(rule: Rule) -> str:
    """One plain sentence saying what ``rule`` does."""
    who = describe_who(rule.who)
    proto = "" if rule.protocol in ("any", msgspec.UNSET) else str(rule.protocol)
    if isinstance(rule.ports, msgspec.UnsetType):
        ports = f"any {proto} port".replace("  ", " ")
    else:
        listed = ", ".join(map(str, rule.ports))
        ports = f"{'port' if len(rule.ports) == 1 else 'ports'} {listed}{'/' + proto if proto else ''}"
    field_name = ADDRESS_FIELD.get(rule.direction)
    addrs = getattr(rule, "from_" if field_name == "from" else field_name) if field_name else msgspec.UNSET
    place = "anywhere" if isinstance(addrs, msgspec.UnsetType) else ", ".join(addrs)
    if place == "any":
        place = "anywhere"
    if rule.direction == "egress":
        what = f"connect to {place} {ports}"
    elif rule.direction == "ingress":
        what = f"accept connections from {place} on {ports}"
    elif rule.direction == "listen":
        what = f"listen on {'any address' if place == 'anywhere' else place} {ports}"
    else:
        what = "open raw or packet sockets"
    if rule.action == "allow":
        text = f"allow {who} to {what}"
    elif rule.action == "alert":
        text = f"alert when {who} tries to {what}"
    else:
        text = f"forbid {who} to {what}"
    if rule.action == "deny" and rule.audit is True:
        text += " (audit only: flagged, not blocked)"
    return text


def compile_policy(policy: LoadedPolicy) -> CompiledPolicy:
    """Flatten a loaded policy into who-classes, kernel entries, defaults and rule info.

    Args:
        policy: The result of :func:`pipeline.policy.load_policy`.

    Returns:
        The compiled policy; ``warnings`` lists what will not be enforced as written.

    Raises:
        PolicyError: More than 64 who-classes, or more than 64 rules on one (direction, protocol, network).
    """
    with paused_gc():
        return _compile(policy)


_ANY_PORTS = ((0, 65535),)
_RAW_PORTS = ((0, 255),)  # a raw rule's entry; the kernel is given the whole port range (see _pack_rules)
_BOTH_PROTOCOLS = (6, 17)
_RAW_PROTOCOLS = (0,)
_ANY_NETWORKS = (_ANY_ADDRESS,)  # no address written, and raw rules
_PROTOCOLS: dict[object, tuple[int, ...]] = {"tcp": (6,), "udp": (17,)}  # anything else: both
# A node key's bits above the network (see node_key), by direction and protocol.
_NODE_BITS = {
    (direction, proto): abi.LPM_KEY_BITS << 184 | code << 144 | proto << 136
    for direction, code in abi.DIRECTIONS.items()
    for proto in (0, 6, 17)
}
_ADDRESS_BITS = (1 << 128) - 1
# The kernel's who mask has 64 bits: a policy with more classes is refused after the pass, and
# the masks packed for those classes (0 here) are never written.
_WHO_BITS = (1 << MAX_WHO_CLASSES) - 1
# A tool_rule with its padding as pad bytes: who mask, port_lo, port_hi, action, rule_id.
_KERNEL_RULE = struct.Struct("<QHHB3xI4x")
assert _KERNEL_RULE.size == abi.RULE.size


def node_key(direction: str, protocol: int, address: ParsedAddress) -> int:
    """The kernel LPM node an entry belongs to: its ``tool_lpm_key`` for slot 0, read as a big-endian integer.

    That is ``(LPM_KEY_BITS + prefixlen) << 184 | direction << 144 | protocol << 136 | address``;
    ``address.bits`` is the network's part of it, ``prefixlen << 184 | address``, so the two parts
    add. Integers hash fast and the garbage collector ignores them.
    """
    return _NODE_BITS[direction, protocol] + address.bits  # + : the two length fields add up


def _pack_rules(row: _RuleRow) -> bytes:
    """The ``tool_rule``s of one rule at one node, packed: one per port range, by rule id.

    The kernel passes a raw socket's protocol as its port (an ethertype for AF_PACKET, up to
    65535), so a raw rule covers every port there (docs/policy.md).
    """
    rule_id, who_class, direction, _, _, ports, action = row
    mask, code = 1 << who_class & _WHO_BITS, abi.ACTIONS[action]
    if direction == "raw":
        return _KERNEL_RULE.pack(mask, 0, 0xFFFF, code, rule_id)
    return b"".join([_KERNEL_RULE.pack(mask, low, high, code, rule_id) for low, high in ports])


# A tool_rule as its first 16 bytes (who mask, ports, action; see _KERNEL_RULE) and its rule id, the
# id widened over the padding after it (ids are below 2**32).
_PREFIXED_ID = struct.Struct("<16sQ")
assert _PREFIXED_ID.size == _KERNEL_RULE.size
_MIN_RUN = 8  # fewer simple rules in a row are compiled one by one: a run's setup costs as much as a few rules


# A rule's direction, protocol, ports, action and audit as written: simple rules of one shape are of one kind.
_Shape = tuple[str, object, tuple[int | str, ...] | msgspec.UnsetType, Action, object]


class _Kind(NamedTuple):
    """What a run of simple rules shares: all but their names, descriptions and addresses."""

    direction: str
    protocols: tuple[int, ...]
    ports: Sequence[tuple[int, int]]  # one range
    action: KernelAction


def _simple_runs(
    rules: list[Rule],
    addresses: list[tuple[ParsedAddress, ...]],
    audit_document: bool,
    port_memo: dict[tuple[int | str, ...], list[tuple[int, int]]],
) -> tuple[list[tuple[ParsedAddress] | None], list[tuple[int, int, _Kind | None]]]:
    """Split a document's rules into runs of simple rules of one kind and runs of other rules.

    A rule is simple when it has no ``who`` (its class is the one of any process), is an egress,
    ingress or listen rule with exactly one address, an IP network (a DNS name is warned about and
    recorded rule by rule), and has no ``ports`` or ports that make one range; any protocol. Simple
    rules that differ only in their names, descriptions and addresses are of one :class:`_Kind`:
    each puts one ``tool_rule`` into one node per protocol, the same but for its rule id, so
    :func:`_add_simple_run` adds a run of them with a few C-level passes (``zip``, ``map``,
    ``dict.setdefault``) where the loop in :func:`_compile` takes a rule at a time.

    This exists for the policy swap's 1 s budget (compile, build the kernel tables, write the maps;
    benchmarks/bench_policy_swap.py): the benchmark's 100k rules, all simple and all but one of
    one kind, took 0.45-0.5 s to compile one by one on the development VM (about 10k machine
    instructions a rule); as runs, with the addresses the loader parsed, about 0.2-0.25 s.

    ``addresses`` are the rules' addresses, parsed (:attr:`SourcedDocument.addresses`). Returns each
    rule's one network (None when the rule is not simple) and the runs as ``(start, stop, kind)``
    over the rules' indices, in order; ``kind`` is None for rules to compile one by one, including
    runs of simple rules shorter than ``_MIN_RUN``.
    """
    unset = msgspec.UNSET
    networks = [found if len(found) == 1 and found[0].network is not None else None for found in addresses]
    shapes = [  # what a rule's kind is made of; None when the rule is not simple whatever its kind
        (rule.direction, rule.protocol, rule.ports if rule.ports is unset else (*rule.ports,), rule.action, rule.audit)
        if network is not None and rule.who is unset
        else None
        for rule, network in zip(rules, networks, strict=True)
    ]
    bounds = [0, *compress(range(1, len(rules)), map(ne, shapes[1:], shapes)), len(rules)] if rules else []
    kinds: dict[_Shape | None, _Kind | None] = {}
    runs: list[tuple[int, int, _Kind | None]] = []
    for start, stop in pairwise(bounds):
        shape = shapes[start]
        if shape not in kinds:
            kinds[shape] = None if shape is None else _kind(shape, audit_document, port_memo)
        runs.append((start, stop, kinds[shape] if stop - start >= _MIN_RUN else None))
    return networks, runs


def _kind(
    shape: _Shape, audit_document: bool, port_memo: dict[tuple[int | str, ...], list[tuple[int, int]]]
) -> _Kind | None:
    """The kind of simple rules of this shape (see :func:`_simple_runs`), None when such rules are not simple."""
    direction, protocol, ports_written, action, audit = shape
    ports: Sequence[tuple[int, int]] = _ANY_PORTS
    if not isinstance(ports_written, msgspec.UnsetType):
        ports = port_memo.get(ports_written) or port_memo.setdefault(
            ports_written, merge_ranges([parse_port(p) for p in ports_written])
        )
    if direction == "raw" or len(ports) != 1:
        return None
    kernel_action: KernelAction = action
    if action == "deny" and (audit is True or audit_document):
        kernel_action = "deny-audit"
    return _Kind(direction, _PROTOCOLS.get(protocol, _BOTH_PROTOCOLS), ports, kernel_action)


def _add_simple_run(
    kind: _Kind,
    first: int,
    networks: Sequence[tuple[ParsedAddress]],
    who_class: int,
    rows: list[_RuleRow],
    nodes: dict[int, bytes],
    shared: set[int],
) -> None:
    """Add the rows and tool_rules of a run of simple rules, the first with id ``first``.

    The same rows and nodes, in the same order, as the loop in :func:`_compile` adds rule by rule;
    ``shared`` gets the nodes named before or more than once.
    """
    direction, protocols, ports, action = kind
    ids = range(first, first + len(networks))
    rows += zip(ids, repeat(who_class), repeat(direction), repeat(protocols), networks, repeat(ports), repeat(action))
    ((low, high),) = ports
    prefix = _KERNEL_RULE.pack(1 << who_class & _WHO_BITS, low, high, abi.ACTIONS[action], 0)[:16]
    packed = list(map(_PREFIXED_ID.pack, repeat(prefix), ids))
    if len(protocols) == 1:
        above = _NODE_BITS[direction, protocols[0]]
        keys = [above + network.bits for (network,) in networks]
    else:  # TCP then UDP, rule by rule
        tcp, udp = _NODE_BITS[direction, 6], _NODE_BITS[direction, 17]
        keys = [key for (network,) in networks for key in (tcp + network.bits, udp + network.bits)]
        packed = list(chain.from_iterable(zip(packed, packed, strict=True)))
    # setdefault adds each node no rule named before, in the order the run names them; a node
    # named before (earlier in the run too) keeps its place, and gets the rule's tool_rule after
    # those it has.
    # (Each rule's tool_rule is a new bytes object from struct.pack, so `is not` tells a node that
    # was there before from one just added; the TCP and UDP keys of a rule share one, but differ.)
    again = list(compress(zip(keys, packed, strict=True), map(is_not, map(nodes.setdefault, keys, packed), packed)))
    for key, value in again:
        nodes[key] += value
    shared.update(key for key, _ in again)


def _compile(policy: LoadedPolicy, column_wise: bool = True) -> CompiledPolicy:
    # One pass over the rules: each is resolved into a _RuleRow (addresses as the loader parsed
    # them, ports and who blocks memoised here) and its tool_rules appended to the kernel nodes it
    # belongs to; runs of simple rules (see _simple_runs) are added a run at a time, unless
    # column_wise is False (for tests: every rule one by one). Entries are made from the rows only
    # when read, and the words that describe a rule are left to RuleTable.
    warnings = [str(w) for w in policy.warnings]
    classes: dict[tuple[object, ...], WhoClass] = {}
    rows: list[_RuleRow] = []
    nodes: dict[int, bytes] = {}  # node key -> its tool_rules, packed, by rule id
    node_of = nodes.get
    shared: set[int] = set()  # the nodes named more than once: only they can have too many rules
    table = RuleTable()
    who_memo: dict[tuple[object, ...], int] = {}  # a rule's who block as written -> class id
    port_memo: dict[tuple[int | str, ...], list[tuple[int, int]]] = {}
    anyone_id = -1
    unset = msgspec.UNSET
    node_bits, protocols_of, kernel_rule, action_codes = _NODE_BITS, _PROTOCOLS, _KERNEL_RULE.pack, abi.ACTIONS
    for doc in policy.documents:
        rules = doc.policy.spec.rules
        if isinstance(rules, msgspec.UnsetType):
            continue
        audit_doc = doc.policy.spec.mode == "audit"
        actions: list[KernelAction] = []
        first = len(table) + 1  # the id of the document's first rule
        table.add(rules, doc.file, doc.positions.item_lines(("spec", "rules"), len(rules)), actions)
        # The loader's parsed addresses, one entry per rule; a document made elsewhere may lack them.
        addresses = doc.addresses if len(doc.addresses) == len(rules) else list(map(rule_addresses, rules))
        simple_networks, runs = (
            _simple_runs(rules, addresses, audit_doc, port_memo) if column_wise else ([], [(0, len(rules), None)])
        )
        for start, stop, kind in runs:
            if kind is not None:
                if anyone_id < 0:
                    anyone_id = _class_id(classes, WhoClass(-1))
                actions += repeat(kind.action, stop - start)
                run = cast(list[tuple[ParsedAddress]], simple_networks[start:stop])  # not None in a run
                _add_simple_run(kind, first + start, run, anyone_id, rows, nodes, shared)
                continue
            for index in range(start, stop):
                rule, rule_id = rules[index], first + index
                who = rule.who
                if who is unset:
                    if anyone_id < 0:
                        anyone_id = _class_id(classes, WhoClass(-1))
                    cls_id = anyone_id
                else:
                    written = tuple(v if v is unset else tuple(v) for v in msgspec.structs.astuple(who))
                    memo_id = who_memo.get(written)
                    if memo_id is None:
                        before = len(warnings)
                        where = doc.where(("spec", "rules", index))
                        cond = who_conditions(who, f"{where}: rule '{rule.name}'", warnings)
                        cls_id = _class_id(classes, cond)
                        if len(warnings) == before:  # a warning names its rule: compute it again for the next one
                            who_memo[written] = cls_id
                    else:
                        cls_id = memo_id
                action: KernelAction = rule.action
                if action == "deny" and (rule.audit is True or audit_doc):
                    action = "deny-audit"
                actions.append(action)
                direction = rule.direction
                if direction == "raw":
                    row: _RuleRow = (rule_id, cls_id, "raw", _RAW_PROTOCOLS, _ANY_NETWORKS, _RAW_PORTS, action)
                    rows.append(row)
                    key = node_key("raw", 0, _ANY_ADDRESS)
                    if key in nodes:
                        shared.add(key)
                    nodes[key] = node_of(key, b"") + _pack_rules(row)
                    continue
                found = addresses[index]
                networks: Sequence[ParsedAddress]
                if not found:
                    networks = _ANY_NETWORKS
                elif len(found) == 1 and found[0].network is not None:
                    networks = found
                else:
                    dns = [a.dns_name for a in found if a.dns_name is not None]
                    if dns:
                        table.set_dns_names(rule_id, dns)
                        where = doc.where(("spec", "rules", index))
                        warnings.append(
                            f"{where}: rule '{rule.name}': DNS names ({', '.join(dns)}) are not enforced "
                            "until DNS awareness lands; they match no connection yet"
                        )
                    nets = [a.network for a in found if a.network is not None]
                    networks = [
                        ParsedAddress(net, None, int(net.network_address), net.prefixlen)
                        for net in (nets if len(nets) == 1 else ipaddress.collapse_addresses(nets))
                    ]
                ports_written = rule.ports
                if ports_written is unset:
                    ports: Sequence[tuple[int, int]] = _ANY_PORTS
                else:
                    port_key = tuple(ports_written)
                    memo_ports = port_memo.get(port_key)
                    if memo_ports is None:
                        memo_ports = port_memo[port_key] = merge_ranges([parse_port(p) for p in ports_written])
                    ports = memo_ports
                protocols = protocols_of.get(rule.protocol, _BOTH_PROTOCOLS)
                row = (rule_id, cls_id, direction, protocols, networks, ports, action)
                rows.append(row)
                if len(ports) == 1:  # _pack_rules, inline for the common case
                    low, high = ports[0]
                    packed = kernel_rule(1 << cls_id & _WHO_BITS, low, high, action_codes[action], rule_id)
                else:
                    packed = _pack_rules(row)
                for proto in protocols:
                    above = node_bits[direction, proto]
                    for address in networks:
                        key = above + address.bits
                        node = node_of(key)
                        if node is None:
                            nodes[key] = packed
                        else:
                            nodes[key] = node + packed
                            shared.add(key)
    errors: list[Diagnostic] = []
    if len(classes) > MAX_WHO_CLASSES:
        errors.append(
            Diagnostic(
                policy.sources[0] if policy.sources else "<policy>",
                0,
                0,
                f"the policy has {len(classes)} distinct 'who' selections, "
                f"the kernel supports at most {MAX_WHO_CLASSES}",
                "reuse identical 'who' blocks across rules so they share one class",
            )
        )
    errors += _crowded_nodes(nodes, shared, policy.sources[0] if policy.sources else "<policy>")
    if errors:
        raise PolicyError(errors)
    defaults: dict[str, dict[str, str]] = {
        mode: {d: policy.defaults.get(mode, {}).get(d, (BUILTIN_DEFAULTS[mode][d], ""))[0] for d in DIRECTIONS}
        for mode in AGENT_MODES
    }
    return CompiledPolicy(
        who_classes=sorted(classes.values(), key=lambda c: c.id),
        entries=CompiledEntries(rows, nodes),
        defaults=defaults,
        rules=table,
        warnings=warnings,
        sources=policy.sources,
    )


def _crowded_nodes(nodes: Mapping[int, bytes], shared: set[int], source: str) -> list[Diagnostic]:
    """One error for each (direction, protocol, network) named by more than MAX_RULES_PER_KEY rules.

    Only a node named more than once (``shared``) can be, and a rule puts one tool_rule per port
    range into a node, so only one with more tool_rules than that can: those alone are counted, by
    their distinct rule ids. The other nodes are not read at all (100k of them are 20-60 ms of
    cache misses).
    """
    limit = MAX_RULES_PER_KEY * _KERNEL_RULE.size
    crowded: dict[int, int] = {}  # node key -> its number of rules
    for key in shared:
        packed = nodes[key]
        if len(packed) > limit:
            count = len({rule[4] for rule in _KERNEL_RULE.iter_unpack(packed)})
            if count > MAX_RULES_PER_KEY:
                crowded[key] = count
    if not crowded:
        return []
    errors: list[Diagnostic] = []
    names = {code: name for name, code in abi.DIRECTIONS.items()}
    for key in filter(crowded.__contains__, nodes):  # in the order the policy names them
        net = ipaddress.IPv6Network((key & _ADDRESS_BITS, (key >> 184) - abi.LPM_KEY_BITS))
        errors.append(
            Diagnostic(
                source,
                0,
                0,
                f"{crowded[key]} rules apply to {names[key >> 144 & 0xFF]} protocol {key >> 136 & 0xFF} network "
                f"{display_network(net)}; the kernel supports at most {MAX_RULES_PER_KEY} rules per "
                "(direction, protocol, network)",
                "merge rules that differ only in ports or processes",
            )
        )
    return errors


def _class_id(classes: dict[tuple[object, ...], WhoClass], cond: WhoClass) -> int:
    """Return the id of the class with ``cond``'s conditions, adding it when it is new."""
    key = cond.key()
    cls = classes.get(key)
    if cls is None:
        cls = WhoClass(len(classes), cond.exe, cond.comm, cond.uid, cond.gid, cond.cgroup)
        classes[key] = cls
    return cls.id
