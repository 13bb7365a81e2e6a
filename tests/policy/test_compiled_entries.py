"""The compiler's entries: made when first read, grouped into kernel nodes in the same pass."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.policy import KernelRule, PolicyError, compile_policy, load_policy
from pipeline.policy.compiler import CompiledEntries

Write = Callable[..., Path]


def rules_on_one_network(count: int, ports: str) -> str:
    return "  rules:\n" + "".join(
        f"    - {{name: r{i}, action: deny, direction: egress, to: [10.0.0.0/8], ports: [{ports}]}}\n"
        for i in range(count)
    )


def test_sixty_four_rules_with_two_port_ranges_on_one_network_are_accepted(write_policy: Write) -> None:
    """The limit counts rules, not the 128 kernel entries that their port ranges put on each node."""
    compiled = compile_policy(load_policy([write_policy(rules_on_one_network(64, "22, 80"))]))
    assert len(compiled.entries) == 256  # 64 rules x 2 port ranges x TCP and UDP


def test_sixty_five_rules_on_one_network_name_the_network_and_count(write_policy: Write) -> None:
    with pytest.raises(PolicyError) as caught:
        compile_policy(load_policy([write_policy(rules_on_one_network(65, "22, 80"))]))
    assert "65 rules apply to egress protocol 6 network 10.0.0.0/8; the kernel supports at most 64" in str(
        caught.value
    )


def test_entries_read_like_a_list_and_carry_the_kernel_nodes(write_policy: Write) -> None:
    path = write_policy(
        "  rules:\n"
        "    - {name: a, action: deny, direction: egress, to: [10.0.0.0/8, 192.0.2.1], ports: [22]}\n"
        "    - {name: b, action: allow, direction: raw}\n"
    )
    entries = compile_policy(load_policy([path])).entries
    assert isinstance(entries, CompiledEntries)
    assert len(entries) == 5  # a: 2 networks x tcp and udp; b: one raw entry
    assert entries[0] == KernelRule(1, 0, "egress", 6, entries[0].network, 22, 22, "deny")
    assert entries[-1].direction == "raw" and (entries[-1].port_lo, entries[-1].port_hi) == (0, 255)
    assert list(entries) == entries[:] and entries == list(entries)
    # One node per (direction, protocol, network): 4 for a, 1 for b.
    assert len(entries.kernel_nodes) == 5


def test_entries_replaced_by_a_list_leave_the_kernel_nodes_behind(write_policy: Write) -> None:
    """A policy whose entries were replaced (the runtime adds its dynamic rules so) is grouped by build_tables."""
    compiled = compile_policy(load_policy([write_policy(rules_on_one_network(2, "22"))]))
    replaced = dataclasses.replace(compiled, entries=[*compiled.entries])
    assert not hasattr(replaced.entries, "kernel_nodes")
