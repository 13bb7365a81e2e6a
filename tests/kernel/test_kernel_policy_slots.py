"""Each swap leaves both policy slots holding exactly their policy: nothing stale, nothing missing."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from loaders import abi
from loaders.sensors import KernelTables, build_tables
from tests.kernel.kernel_harness import Harness

pytestmark = pytest.mark.kernel

U32 = struct.Struct("<I")


def deny(name: str, *to: str, ports: list[int] | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"name": name, "action": "deny", "direction": "egress", "to": list(to)}
    if ports:
        rule["ports"] = ports
    return rule


A = [deny("a1", "10.0.0.0/8"), deny("a2", "10.1.0.0/16", ports=[22]), deny("a3", "2001:db8::/32")]
B = [deny("b1", "192.0.2.0/24"), deny("b2", "10.1.0.0/16"), deny("b3", "198.51.100.7", ports=[80, 443])]
A_PLUS = [*A, deny("a4", "10.1.2.3")]


def tables_of(h: Harness, rules: list[dict[str, Any]]) -> KernelTables:
    compiled, _ = h.apply(rules)
    return build_tables(compiled, "/")


def expected_slot(tables: KernelTables, slot: int) -> tuple[dict[bytes, bytes], list[bytes]]:
    """The LPM entries and rules array entries a slot must hold, packed here with the ABI layouts."""
    lpm_key, lpm_value, rule_layout = abi.LPM_KEY.compile(), abi.LPM_VALUE.compile(), abi.RULE.compile()
    entries: dict[bytes, bytes] = {}
    rules: list[bytes] = []
    for node in tables.nodes:
        address = node.network.network_address.packed
        key = lpm_key.pack(abi.LPM_KEY_BITS + node.network.prefixlen, slot, node.direction, node.protocol, 0, address)
        first = slot * abi.SLOT_RULES + len(rules)
        entries[key] = lpm_value.pack(first, len(node.rules), node.parent_len)
        rules += [rule_layout.pack(who, lo, hi, act, bytes(3), rid, 0) for who, lo, hi, act, rid in node.rules]
    return entries, rules


def slot_contents(h: Harness, slot: int, rule_count: int) -> tuple[dict[bytes, bytes], list[bytes]]:
    """What the kernel maps hold for ``slot``: its LPM entries and the first ``rule_count`` rules."""
    nodes = h.sensors.maps["rule_nodes"]
    entries = {key: nodes.lookup(key) or b"" for key in nodes.keys() if key[4] == slot}
    rules = h.sensors.maps["rules"]
    first = slot * abi.SLOT_RULES
    return entries, [rules.lookup(U32.pack(first + i)) or b"" for i in range(rule_count)]


def active_slot(h: Harness) -> int:
    value = h.sensors.maps["config"].lookup(U32.pack(abi.CFG_ACTIVE_SLOT))
    assert value is not None
    return int(U32.unpack(value)[0])


def test_each_slot_holds_exactly_its_policy_across_swaps(h: Harness) -> None:
    """Same policy again, a different one, one rule more, nothing: both slots always match their policy."""
    previous: KernelTables | None = None
    for rules in (A, A, B, A, A_PLUS, A_PLUS, [], B):
        tables = tables_of(h, rules)
        slot = active_slot(h)
        assert slot_contents(h, slot, tables.rule_entries) == expected_slot(tables, slot)
        if previous is not None:
            assert slot_contents(h, 1 - slot, previous.rule_entries) == expected_slot(previous, 1 - slot)
        previous = tables


@pytest.mark.parametrize(
    ("map_name", "method"),
    [("rule_nodes", "delete_packed"), ("rule_nodes", "update_packed"), ("rules", "update_packed")],
)
def test_a_failed_write_is_mended_by_the_next_swap(
    h: Harness, monkeypatch: pytest.MonkeyPatch, map_name: str, method: str
) -> None:
    """A write that fails half way keeps the running policy, and the next swaps leave no stale entry."""
    tables_of(h, A)
    tables_of(h, A)  # both slots hold A: swapping in B deletes A's nodes, then writes B's
    target = h.sensors.maps[map_name]
    real = getattr(target, method)

    def write_then_fail(*args: Any) -> None:
        real(*args)
        raise OSError("injected")

    monkeypatch.setattr(target, method, write_then_fail)
    running = active_slot(h)
    with pytest.raises(OSError, match="injected"):
        tables_of(h, B)
    assert active_slot(h) == running
    monkeypatch.undo()
    for rules in (A_PLUS, B, A):
        tables = tables_of(h, rules)
        slot = active_slot(h)
        assert slot_contents(h, slot, tables.rule_entries) == expected_slot(tables, slot)


def test_the_compiled_policy_swaps_in_whole(h: Harness) -> None:
    """A policy with nested prefixes, several ports and both protocols reads back node for node."""
    rules = [deny("n1", "10.0.0.0/8", ports=[22, 80, 443]), deny("n2", "10.1.0.0/16"), deny("n3", "10.1.2.0/24")]
    compiled, _ = h.apply(rules)
    tables = build_tables(compiled, "/")
    slot = active_slot(h)
    assert slot_contents(h, slot, tables.rule_entries) == expected_slot(tables, slot)
    # Three nested prefixes, each for TCP and UDP: each node's parent is the one around it.
    assert sorted(n.parent_len for n in tables.nodes) == [0, 0] + [abi.LPM_KEY_BITS + 104] * 2 + [
        abi.LPM_KEY_BITS + 112
    ] * 2
