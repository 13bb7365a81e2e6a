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
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from pipeline.policy.addresses import ANY_NETWORK, display_network, parse_address
from pipeline.policy.diagnostics import Diagnostic, PolicyError
from pipeline.policy.loader import ADDRESS_FIELD, LoadedPolicy, SourcedDocument
from pipeline.policy.model import AGENT_MODES, BUILTIN_DEFAULTS, DIRECTIONS, Rule, Who
from pipeline.policy.ports import merge_ranges, parse_port
from pipeline.policy.yamlpos import paused_gc

KernelAction = Literal["allow", "alert", "deny-audit", "deny"]
ACTION_RANK: dict[str, int] = {"allow": 0, "alert": 1, "deny-audit": 2, "deny": 3}
"""Precedence among matching rules: the highest rank wins."""
PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17}
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
        return tuple(
            None if v is None else tuple(v) for v in (self.exe, self.comm, self.uid, self.gid, self.cgroup)
        )

    def is_anyone(self) -> bool:
        """Return whether the class places no condition at all."""
        return all(v is None for v in (self.exe, self.comm, self.uid, self.gid, self.cgroup))


@dataclass(frozen=True, slots=True)
class KernelRule:
    """One entry of the kernel's rule table (IPv4 is carried v4-mapped in ``network``)."""

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


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """The whole policy, flattened. ``rules`` maps rule_id (from 1, in merge order) to its info."""

    who_classes: list[WhoClass]
    entries: list[KernelRule]
    defaults: dict[str, dict[str, str]]
    rules: dict[int, RuleInfo]
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
            warnings.append(
                f"{where}: {lookup} '{item}' does not exist on this host; it matches no process here"
            )
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
        gid=None
        if isinstance(who.group, msgspec.UnsetType)
        else _resolve(who.group, "group", where, warnings),
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


def _kernel_action(rule: Rule, doc: SourcedDocument) -> KernelAction:
    if rule.action != "deny":
        return rule.action
    return "deny-audit" if rule.audit is True or doc.policy.spec.mode == "audit" else "deny"


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


def _compile(policy: LoadedPolicy) -> CompiledPolicy:
    warnings = [str(w) for w in policy.warnings]
    classes: dict[tuple[object, ...], WhoClass] = {}
    entries: list[KernelRule] = []
    infos: dict[int, RuleInfo] = {}
    rule_id = 0
    per_key: dict[tuple[str, int, int, int], set[int]] = defaultdict(set)
    key_networks: dict[tuple[str, int, int, int], ipaddress.IPv6Network] = {}
    anyone = WhoClass(-1)
    anyone_key = anyone.key()
    for doc in policy.documents:
        rules = doc.policy.spec.rules
        if isinstance(rules, msgspec.UnsetType):
            continue
        for index, rule in enumerate(rules):
            rule_id += 1
            where = doc.where(("spec", "rules", index))
            cond = (
                anyone
                if rule.who is msgspec.UNSET
                else who_conditions(rule.who, f"{where}: rule '{rule.name}'", warnings)
            )
            cond_key = anyone_key if cond is anyone else cond.key()
            cls = classes.get(cond_key)
            if cls is None:
                cls = WhoClass(len(classes), cond.exe, cond.comm, cond.uid, cond.gid, cond.cgroup)
                classes[cond_key] = cls
            action = _kernel_action(rule, doc)
            field_name = ADDRESS_FIELD.get(rule.direction)
            specs = (
                getattr(rule, "from_" if field_name == "from" else field_name)
                if field_name
                else msgspec.UNSET
            )
            networks: list[ipaddress.IPv6Network] = []
            dns: list[str] = []
            if isinstance(specs, msgspec.UnsetType):
                networks = [ANY_NETWORK]
            else:
                for spec in specs:
                    parsed = parse_address(spec)
                    if parsed.network is not None:
                        networks.append(parsed.network)
                    elif parsed.dns_name is not None:
                        dns.append(parsed.dns_name)
            if dns:
                warnings.append(
                    f"{where}: rule '{rule.name}': DNS names ({', '.join(dns)}) are not enforced "
                    "until DNS awareness lands; they match no connection yet"
                )
            infos[rule_id] = RuleInfo(
                name=rule.name,
                description=rule.description if isinstance(rule.description, str) else "",
                source=where,
                action=action,
                audit=action == "deny-audit",
                explanation=describe_rule(rule),
                direction=rule.direction,
                dns_names=dns,
            )
            if rule.direction == "raw":
                entries.append(KernelRule(rule_id, cls.id, "raw", 0, ANY_NETWORK, 0, 255, action))
                per_key[("raw", 0, 0, 0)].add(rule_id)
                key_networks.setdefault(("raw", 0, 0, 0), ANY_NETWORK)
                continue
            collapsed = networks if len(networks) == 1 else list(ipaddress.collapse_addresses(networks))
            ports = (
                [(0, 65535)]
                if isinstance(rule.ports, msgspec.UnsetType)
                else merge_ranges([parse_port(p) for p in rule.ports])
            )
            protocols = (
                [6, 17] if rule.protocol in ("any", msgspec.UNSET) else [PROTOCOL_NUMBERS[str(rule.protocol)]]
            )
            for proto in protocols:
                for net in collapsed:
                    net_key = (rule.direction, proto, int(net.network_address), net.prefixlen)
                    per_key[net_key].add(rule_id)
                    key_networks.setdefault(net_key, net)
                    for low, high in ports:
                        entries.append(
                            KernelRule(rule_id, cls.id, rule.direction, proto, net, low, high, action)
                        )
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
    for key, ids in per_key.items():
        if len(ids) > MAX_RULES_PER_KEY:
            direction, proto, net = key[0], key[1], key_networks[key]
            errors.append(
                Diagnostic(
                    policy.sources[0] if policy.sources else "<policy>",
                    0,
                    0,
                    f"{len(ids)} rules apply to {direction} protocol {proto} network {display_network(net)}; "
                    f"the kernel supports at most {MAX_RULES_PER_KEY} rules per "
                    "(direction, protocol, network)",
                    "merge rules that differ only in ports or processes",
                )
            )
    if errors:
        raise PolicyError(errors)
    defaults: dict[str, dict[str, str]] = {
        mode: {
            d: policy.defaults.get(mode, {}).get(d, (BUILTIN_DEFAULTS[mode][d], ""))[0] for d in DIRECTIONS
        }
        for mode in AGENT_MODES
    }
    return CompiledPolicy(
        who_classes=sorted(classes.values(), key=lambda c: c.id),
        entries=entries,
        defaults=defaults,
        rules=infos,
        warnings=warnings,
        sources=policy.sources,
    )
