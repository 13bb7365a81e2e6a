"""Compare two compiled policies by evaluating both over the boundary flows of their rules."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.policy.addresses import display_address
from pipeline.policy.compiler import CompiledPolicy, KernelRule, WhoClass
from pipeline.policy.evaluate import Decision, Flow, evaluate
from pipeline.policy.globs import example_of


@dataclass(frozen=True, slots=True)
class Change:
    """One flow whose decision differs between the old and the new policy."""

    flow: Flow
    mode: str
    old: Decision
    new: Decision


def _who_examples(cls: WhoClass) -> dict[str, object]:
    return {
        "exe": example_of(cls.exe[0]) if cls.exe else None,
        "comm": example_of(cls.comm[0]) if cls.comm else None,
        "uid": cls.uid[0] if cls.uid else None,
        "gid": cls.gid[0] if cls.gid else None,
        "cgroup": example_of(cls.cgroup[0]).lstrip("/") if cls.cgroup else None,
    }


def _edges(entry: KernelRule) -> Iterator[tuple[ipaddress.IPv6Address, int]]:
    net = entry.network
    addrs = [net.network_address, net.broadcast_address]
    if int(net.network_address) > 0:
        addrs.append(net.network_address - 1)
    if int(net.broadcast_address) < 2**128 - 1:
        addrs.append(net.broadcast_address + 1)
    ports = {entry.port_lo, entry.port_hi, max(entry.port_lo - 1, 0), min(entry.port_hi + 1, 65535)}
    for addr in addrs:
        for port in sorted(ports):
            yield addr, port


def boundary_flows(*policies: CompiledPolicy) -> list[Flow]:
    """Flows at the edges of every rule of ``policies``, for every who-class and for an unknown process."""
    whos: list[dict[str, object]] = [
        {
            "exe": "/nonexistent/unlisted",
            "comm": "unlisted",
            "uid": 4242,
            "gid": 4242,
            "cgroup": "unlisted.slice/unlisted.scope",
        }
    ]
    for pol in policies:
        whos += [_who_examples(c) for c in pol.who_classes]
    flows: dict[Flow, None] = {}
    for direction in ("egress", "ingress", "listen"):
        flows[Flow(direction, "tcp", "192.0.2.1", 9, **whos[0])] = None  # type: ignore[arg-type]
    flows[Flow("raw", 0, "::", 0, **whos[0])] = None  # type: ignore[arg-type]
    for pol in policies:
        for entry in pol.entries:
            for who in whos:
                if entry.direction == "raw":
                    flows[Flow("raw", 0, "::", 0, **who)] = None  # type: ignore[arg-type]
                    continue
                proto = "tcp" if entry.protocol == 6 else "udp"
                for addr, port in _edges(entry):
                    flows[Flow(entry.direction, proto, display_address(addr), port, **who)] = None  # type: ignore[arg-type]
    return list(flows)


def diff_policies(old: CompiledPolicy, new: CompiledPolicy) -> list[Change]:
    """Return the boundary flows whose verdict or deciding rule changes, in either agent mode."""
    changes: list[Change] = []
    for flow in boundary_flows(old, new):
        for mode in ("detect", "prevent"):
            before, after = evaluate(old, flow, mode), evaluate(new, flow, mode)
            if before.verdict != after.verdict:
                changes.append(Change(flow, mode, before, after))
    return changes


def group_changes(changes: list[Change]) -> list[tuple[Change, int]]:
    """Group changes by (mode, old verdict and rule, new verdict and rule): one example and a count each."""
    groups: dict[tuple[str, str, str, str, str], list[Change]] = {}
    for change in changes:
        key = (
            change.mode,
            change.old.verdict,
            change.old.rule_name,
            change.new.verdict,
            change.new.rule_name,
        )
        groups.setdefault(key, []).append(change)
    return [(members[0], len(members)) for members in groups.values()]
