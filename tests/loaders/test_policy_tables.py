"""The compiled policy and its kernel tables equal an independent, plain construction of both."""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loaders import abi
from loaders.sensors import KernelTables, TablesError, _network_bits, build_tables
from pipeline.policy import CompiledPolicy, compile_policy, load_policy
from pipeline.policy.ports import WELL_KNOWN_PORTS
from tests.kernel_support import require_native

# Nested prefixes in both families, 'any' and a DNS name (which matches nothing yet).
ADDRESSES = [
    "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3", "10.1.2.4/31", "0.0.0.0/0", "any",
    "2001:db8::/32", "2001:db8:1::/48", "2001:db8:1::7", "::/0", "::ffff:10.1.2.3", "db.example.com",
]  # fmt: skip
PORTS = [22, 443, "https", "8000-8080", "8080-9000", 1, 65535, "dns"]
# Distinct 'who' blocks (None: any process). Numbers only, so nothing depends on this host's users.
WHOS: list[dict[str, Any] | None] = [
    None, {"exe": ["/usr/bin/curl"]}, {"user": [0]}, {"comm": ["nginx"], "group": [0]}, {"cgroup": ["/a.slice"]},
]  # fmt: skip
ACTION_CODES = {"allow": abi.ACT_ALLOW, "alert": abi.ACT_ALERT, "deny-audit": abi.ACT_DENY_AUDIT, "deny": abi.ACT_DENY}


@pytest.fixture(autouse=True, params=["native", "python"])
def table_builder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs twice: tables packed by the native helper, and by the Python code."""
    if request.param == "native":
        require_native()
    monkeypatch.setenv("TOOL_NATIVE", "1" if request.param == "native" else "0")
    return str(request.param)


@st.composite
def policy_rules(draw: st.DrawFn) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(draw(st.integers(0, 14))):
        direction = draw(st.sampled_from(["egress", "ingress", "listen", "raw"]))
        action = draw(st.sampled_from(["allow", "alert", "deny"]))
        rule: dict[str, Any] = {"name": f"r{i}", "action": action, "direction": direction}
        if action == "deny" and draw(st.booleans()):
            rule["audit"] = True
        who = draw(st.sampled_from(WHOS))
        if who is not None:
            rule["who"] = who
        if direction != "raw":
            field = {"egress": "to", "ingress": "from", "listen": "bind"}[direction]
            if draw(st.integers(0, 3)):
                rule[field] = draw(st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=3, unique=True))
            if draw(st.booleans()):
                rule["ports"] = draw(st.lists(st.sampled_from(PORTS), min_size=1, max_size=3, unique=True))
            if draw(st.booleans()):
                rule["protocol"] = draw(st.sampled_from(["tcp", "udp", "any"]))
        out.append(rule)
    return out


def write(tmp: Path, rules: list[dict[str, Any]], audit: bool = False) -> Path:
    spec: dict[str, Any] = {"rules": rules}
    if audit:
        spec["mode"] = "audit"
    doc = {"apiVersion": "tool/v1", "kind": "Policy", "metadata": {"name": "t"}, "spec": spec}
    path = tmp / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def plain_entries(rules: list[dict[str, Any]], audit: bool) -> list[tuple[Any, ...]]:
    """The kernel entries, flattened rule by rule with ipaddress and nothing of the compiler."""
    classes: list[Any] = []
    out: list[tuple[Any, ...]] = []
    for rule_id, rule in enumerate(rules, start=1):
        who = rule.get("who")
        if who not in classes:
            classes.append(who)
        cls = classes.index(who)
        action = rule["action"]
        if action == "deny" and (rule.get("audit") or audit):
            action = "deny-audit"
        direction = rule["direction"]
        if direction == "raw":
            out.append((rule_id, cls, "raw", 0, ipaddress.IPv6Network("::/0"), 0, 255, action))
            continue
        specs = rule.get({"egress": "to", "ingress": "from", "listen": "bind"}[direction], ["any"])
        nets: list[ipaddress.IPv6Network] = []
        for spec in specs:
            if spec == "any":
                nets.append(ipaddress.IPv6Network("::/0"))
            elif spec[0].isdigit() or ":" in spec:
                net = ipaddress.ip_network(spec)
                if isinstance(net, ipaddress.IPv4Network):
                    base = int(ipaddress.IPv6Address("::ffff:0:0")) + int(net.network_address)
                    net = ipaddress.IPv6Network((base, 96 + net.prefixlen))
                nets.append(net)
        if len(nets) > 1:
            nets = list(ipaddress.collapse_addresses(nets))
        ranges = []
        for port in rule.get("ports", []):
            if isinstance(port, int):
                ranges.append((port, port))
            elif port in WELL_KNOWN_PORTS:
                ranges.append((WELL_KNOWN_PORTS[port], WELL_KNOWN_PORTS[port]))
            else:
                low, high = port.split("-")
                ranges.append((int(low), int(high)))
        merged: list[tuple[int, int]] = []
        for low, high in sorted(ranges):
            if merged and low <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], high))
            else:
                merged.append((low, high))
        protocols = {"tcp": [6], "udp": [17]}.get(rule.get("protocol", "any"), [6, 17])
        for proto in protocols:
            for net in nets:
                for low, high in merged or [(0, 65535)]:
                    out.append((rule_id, cls, direction, proto, net, low, high, action))
    return out


def plain_tables(compiled: CompiledPolicy) -> tuple[bytes, bytes, bytes]:
    """LPM keys, LPM values and rules for slot 0, packed with the ABI layouts from the compiled entries.

    The nodes are in key order, and the rules array holds each node's rules in that order.
    """
    nodes: dict[tuple[int, int, ipaddress.IPv6Network], list[tuple[int, ...]]] = {}
    for e in compiled.entries:
        direction = abi.DIRECTIONS[e.direction]
        lo, hi = (0, 0xFFFF) if direction == abi.DIR_RAW else (e.port_lo, e.port_hi)
        rule = (1 << e.who_class, lo, hi, ACTION_CODES[e.action], e.rule_id)
        nodes.setdefault((direction, e.protocol, e.network), []).append(rule)
    keys: list[bytes] = []
    values: list[bytes] = []
    rules: list[bytes] = []
    lpm_key, lpm_value, rule_layout = abi.LPM_KEY.compile(), abi.LPM_VALUE.compile(), abi.RULE.compile()
    # Nodes go in the order of their packed keys (prefix length first, then direction, protocol, address).
    def packed_key(node: tuple[int, int, ipaddress.IPv6Network]) -> bytes:
        direction, proto, net = node
        return lpm_key.pack(abi.LPM_KEY_BITS + net.prefixlen, 0, direction, proto, 0, net.network_address.packed)

    for (direction, proto, net), node_rules in sorted(nodes.items(), key=lambda item: packed_key(item[0])):
        enclosing = [
            other.prefixlen
            for d, p, other in nodes
            if (d, p) == (direction, proto) and other != net and other.supernet_of(net)
        ]
        parent_len = abi.LPM_KEY_BITS + max(enclosing) if enclosing else 0
        address = net.network_address.packed
        keys.append(lpm_key.pack(abi.LPM_KEY_BITS + net.prefixlen, 0, direction, proto, 0, address))
        values.append(lpm_value.pack(len(rules), len(node_rules), parent_len))
        for who, lo, hi, action, rule_id in sorted(node_rules, key=lambda r: r[4]):
            rules.append(rule_layout.pack(who, lo, hi, action, bytes(3), rule_id, 0))
    return b"".join(keys), b"".join(values), b"".join(rules)


def packed(tables: KernelTables) -> tuple[bytes, bytes, bytes]:
    return tables.lpm_keys, tables.lpm_values, tables.rules


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rules=policy_rules(), audit=st.booleans())
def test_compiled_entries_and_tables_equal_a_plain_construction(
    tmp_path: Path, rules: list[dict[str, Any]], audit: bool
) -> None:
    """Entries (order included), who-classes, LPM nodes with their parents, and every packed byte."""
    compiled = compile_policy(load_policy([write(tmp_path, rules, audit)]))
    assert [tuple(e) for e in compiled.entries] == plain_entries(rules, audit)
    assert len(compiled.who_classes) == len({repr(r.get("who")) for r in rules})
    tables = build_tables(compiled, "/sys/fs/cgroup")
    assert packed(tables) == plain_tables(compiled)
    # The compiler groups its entries into nodes itself; entries in a plain list are grouped by
    # build_tables: both must give the same bytes.
    as_list = dataclasses.replace(compiled, entries=list(compiled.entries))
    assert not hasattr(as_list.entries, "kernel_nodes")
    assert packed(build_tables(as_list, "/sys/fs/cgroup")) == packed(tables)
    assert tables.rule_entries == len(compiled.entries)


def test_entries_out_of_rule_order_give_the_same_tables(tmp_path: Path) -> None:
    """Entries out of rule order (here shuffled) give the same nodes, each listing its rules by rule id."""
    rules: list[dict[str, Any]] = [
        {"name": f"r{i}", "action": "deny" if i % 3 else "allow", "direction": "egress", "to": [a]}
        for i, a in enumerate(["10.0.0.0/8", "10.1.0.0/16", "10.1.0.0/16", "10.1.2.3", "10.0.0.0/8"] * 3)
    ]
    compiled = compile_policy(load_policy([write(tmp_path, rules)]))
    shuffled = list(compiled.entries)
    random.Random(7).shuffle(shuffled)
    again = CompiledPolicy(compiled.who_classes, shuffled, compiled.defaults, compiled.rules, [], [])
    assert packed(build_tables(compiled, "/")) == plain_tables(compiled)
    assert node_set(build_tables(again, "/")) == node_set(build_tables(compiled, "/"))


def node_set(tables: KernelTables) -> list[tuple[Any, ...]]:
    """The nodes with their rules and parents, in no particular order (the rules array layout may differ)."""
    nodes = [(n.direction, n.protocol, n.network, sorted(n.rules), n.parent_len) for n in tables.nodes]
    return sorted(nodes, key=repr)


def test_nodes_unpack_the_packed_tables(tmp_path: Path) -> None:
    rules: list[dict[str, Any]] = [
        {"name": "outer", "action": "deny", "direction": "egress", "to": ["10.0.0.0/8"], "ports": [22, 80]},
        {"name": "inner", "action": "allow", "direction": "egress", "to": ["10.1.0.0/16"], "protocol": "tcp"},
    ]
    tables = build_tables(compile_policy(load_policy([write(tmp_path, rules)])), "/")
    summary = [(n.direction, n.protocol, str(n.network), n.parent_len, len(n.rules)) for n in tables.nodes]
    assert summary == [
        (abi.DIR_EGRESS, 6, "::ffff:a00:0/104", 0, 2),
        (abi.DIR_EGRESS, 17, "::ffff:a00:0/104", 0, 2),
        (abi.DIR_EGRESS, 6, "::ffff:a01:0/112", abi.LPM_KEY_BITS + 104, 1),
    ]


@pytest.mark.parametrize("text", ["::/0", "::ffff:10.0.0.0/104", "2001:db8::/32", "2001:db8::7/128"])
def test_network_bits_read_from_ipaddress_internals_match_the_public_api(text: str) -> None:
    """The node key bits come from ipaddress's private attributes: this fails if they ever change meaning."""
    net = ipaddress.IPv6Network(text)
    expected = (abi.LPM_KEY_BITS + net.prefixlen) << 184 | int(net.network_address)
    assert _network_bits(net) == expected


def test_too_deep_nesting_and_too_many_rules_on_a_prefix_are_refused(tmp_path: Path) -> None:
    """The kernel walks at most MAX_NESTING enclosing prefixes and scans at most MAX_NODE_RULES per prefix."""
    nested: list[dict[str, Any]] = [
        {"name": f"n{bits}", "action": "deny", "direction": "egress", "to": [f"10.0.0.0/{bits}"], "protocol": "tcp"}
        for bits in range(8, 8 + abi.MAX_NESTING + 1)
    ]
    compiled = compile_policy(load_policy([write(tmp_path, nested[:-1])]))
    assert max(n.parent_len for n in build_tables(compiled, "/").nodes) == abi.LPM_KEY_BITS + 96 + 8 + 14
    compiled = compile_policy(load_policy([write(tmp_path, nested)]))
    with pytest.raises(TablesError, match=r"address ::ffff:a00:0/120 is nested in more than 16 other prefixes"):
        build_tables(compiled, "/")
    ports: list[dict[str, Any]] = [
        {"name": "many", "action": "deny", "direction": "egress", "to": ["10.0.0.1"], "protocol": "udp",
         "ports": [2 * i + 1 for i in range(abi.MAX_NODE_RULES + 1)]}
    ]  # fmt: skip
    compiled = compile_policy(load_policy([write(tmp_path, ports)]))
    with pytest.raises(TablesError, match=r"65 rules share the destination ::ffff:a00:1/128 \(egress, protocol 17\)"):
        build_tables(compiled, "/")
