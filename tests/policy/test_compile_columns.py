"""Runs of simple rules, compiled a run at a time, give exactly what compiling every rule one by one gives."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pipeline.policy import CompiledPolicy, LoadedPolicy, PolicyError, load_policy
from pipeline.policy.compiler import CompiledEntries, _compile, _simple_runs

# Shared and nested destinations in both families, one network written two ways (10.1.2.3 and
# ::ffff:10.1.2.3), and 'any'; DNS names are not enforced, and warned about rule by rule.
NETWORKS = [
    "10.0.0.0/8", "10.1.2.0/24", "10.1.2.3", "::ffff:10.1.2.3", "192.0.2.7", "2001:db8::/32", "2001:db8::1",
    "any", "0.0.0.0/0",
]  # fmt: skip
ADDRESSES = [*NETWORKS, "db.example.com", "*.example.org"]
# One port range each (80 and 81 merge into one, 443 and https too), and lists that make several.
PORTS: list[list[int | str]] = [[22], [443, "https"], ["8000-8080"], [80, 81], ["dns"], [22, 80], [1, 65535]]
# None: no 'who'. A user missing on this host is warned about, naming the rule.
WHOS: list[dict[str, Any] | None] = [
    None, None, None, None, {"exe": ["/usr/bin/curl"]}, {"user": [0]}, {"user": ["no-such-user-here"]},
]  # fmt: skip
FIELDS = {"egress": "to", "ingress": "from", "listen": "bind"}


@st.composite
def shapes(draw: st.DrawFn) -> dict[str, Any]:
    """What a block of rules shares: all but names and addresses."""
    direction = draw(st.sampled_from(["egress", "egress", "ingress", "listen", "raw"]))
    shape: dict[str, Any] = {"action": draw(st.sampled_from(["allow", "alert", "deny"])), "direction": direction}
    if shape["action"] == "deny" and draw(st.booleans()):
        shape["audit"] = True
    who = draw(st.sampled_from(WHOS))
    if who is not None:
        shape["who"] = who
    if direction != "raw":
        if draw(st.booleans()):
            shape["ports"] = draw(st.sampled_from(PORTS))
        if draw(st.booleans()):
            shape["protocol"] = draw(st.sampled_from(["tcp", "udp", "any"]))
    return shape


@st.composite
def documents(draw: st.DrawFn) -> list[tuple[list[dict[str, Any]], bool]]:
    """Up to three documents (rules, audit mode), each of blocks of 1 to 16 rules of one shape.

    In a block of one shape where every rule has one network, simple rules make a run long enough
    to be compiled a run at a time; in the other blocks, rules may have no address, several or DNS
    names. Addresses come from a small set, so destinations repeat.
    """
    docs: list[tuple[list[dict[str, Any]], bool]] = []
    for d in range(draw(st.integers(1, 3))):
        rules: list[dict[str, Any]] = []
        for _ in range(draw(st.integers(0, 4))):
            shape = draw(shapes())
            field = FIELDS.get(shape["direction"])
            one_network = draw(st.integers(0, 3)) > 0
            for _ in range(draw(st.sampled_from([1, 2, 5, 8, 9, 13, 16]))):
                rule = {"name": f"d{d}-r{len(rules)}", **shape}
                if field is not None and one_network:
                    rule[field] = [draw(st.sampled_from(NETWORKS))]
                elif field is not None and draw(st.booleans()):
                    rule[field] = draw(st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=3, unique=True))
                rules.append(rule)
        docs.append((rules, draw(st.booleans())))
    return docs


def load(tmp: Path, docs: list[tuple[list[dict[str, Any]], bool]]) -> LoadedPolicy:
    paths = []
    for index, (rules, audit) in enumerate(docs):
        spec: dict[str, Any] = {"rules": rules, **({"mode": "audit"} if audit else {})}
        doc = {"apiVersion": "tool/v1", "kind": "Policy", "metadata": {"name": f"d{index}"}, "spec": spec}
        paths.append(tmp / f"{index}.yaml")
        paths[-1].write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_policy(paths)


def assert_same(by_runs: CompiledPolicy, one_by_one: CompiledPolicy) -> None:
    """Every part of the two compiled policies is equal, the kernel nodes in the same order too."""
    assert isinstance(by_runs.entries, CompiledEntries) and isinstance(one_by_one.entries, CompiledEntries)
    assert list(by_runs.entries.kernel_nodes.items()) == list(one_by_one.entries.kernel_nodes.items())
    assert by_runs.entries._rows == one_by_one.entries._rows
    assert list(by_runs.entries) == list(one_by_one.entries)
    assert by_runs.who_classes == one_by_one.who_classes
    assert by_runs.warnings == one_by_one.warnings
    assert dict(by_runs.rules.items()) == dict(one_by_one.rules.items())
    assert (by_runs.defaults, by_runs.sources) == (one_by_one.defaults, one_by_one.sources)


@settings(max_examples=150, deadline=None)
@given(docs=documents())
def test_runs_compile_as_rules_one_by_one(
    tmp_path_factory: pytest.TempPathFactory, docs: list[tuple[list[dict[str, Any]], bool]]
) -> None:
    """Rows, kernel nodes (their order too), who-classes, warnings and rule info, over mixed documents."""
    loaded = load(tmp_path_factory.mktemp("docs"), docs)
    runs = [
        run
        for doc in loaded.documents
        if isinstance(doc.policy.spec.rules, list)
        for run in _simple_runs(doc.policy.spec.rules, doc.addresses, doc.policy.spec.mode == "audit", {})[1]
    ]
    count = sum(kind is not None for *_, kind in runs)
    event(f"runs compiled a run at a time: {count if count < 3 else '3 or more'}")
    assert_same(_compile(loaded), _compile(loaded, column_wise=False))
    # Independent of the loader's parsed addresses: documents without them are parsed by the compiler.
    bare = dataclasses.replace(loaded, documents=[dataclasses.replace(d, addresses=[]) for d in loaded.documents])
    assert_same(_compile(bare, column_wise=False), _compile(loaded, column_wise=False))


def test_a_block_list_is_one_run(tmp_path: Path) -> None:
    """The shape of the swap benchmark's policy: an allow, then deny rules of one shape on one address each."""
    rules = [{"name": "lo", "action": "allow", "direction": "egress", "to": ["127.0.0.0/8"]}] + [
        {"name": f"r{i}", "action": "deny", "direction": "egress", "to": [f"10.0.{i // 4}.{i % 4 * 64}/26"]}
        for i in range(40)
    ]
    loaded = load(tmp_path, [(rules, False)])
    doc = loaded.documents[0]
    assert isinstance(doc.policy.spec.rules, list)
    _, runs = _simple_runs(doc.policy.spec.rules, doc.addresses, False, {})
    assert [(start, stop, kind is not None) for start, stop, kind in runs] == [(0, 1, False), (1, 41, True)]
    assert_same(_compile(loaded), _compile(loaded, column_wise=False))
    # Independent of the loader's parsed addresses: documents without them are parsed by the compiler.
    bare = dataclasses.replace(loaded, documents=[dataclasses.replace(d, addresses=[]) for d in loaded.documents])
    assert_same(_compile(bare, column_wise=False), _compile(loaded, column_wise=False))


@pytest.mark.parametrize(("simple", "other", "simple_first"), [(40, 30, True), (40, 30, False), (70, 0, True)])
def test_too_many_rules_on_a_network_are_the_same_errors(
    tmp_path: Path, simple: int, other: int, simple_first: bool
) -> None:
    """Two networks named by 70 rules each, in runs, one by one or both, give the same errors in the same order."""
    runs = [
        {"name": f"s{i}", "action": "deny", "direction": "egress", "to": [net]}
        for i, net in enumerate(["10.0.0.0/8", "192.0.2.0/24"] * simple)
    ]
    one_by_one = [  # two port ranges: not simple
        {"name": f"o{i}", "action": "deny", "direction": "egress", "to": [net], "ports": [22, 80]}
        for i, net in enumerate(["192.0.2.0/24", "10.0.0.0/8"] * other)
    ]
    loaded = load(tmp_path, [(runs + one_by_one if simple_first else one_by_one + runs, False)])
    with pytest.raises(PolicyError) as compiled_by_runs:
        _compile(loaded)
    with pytest.raises(PolicyError) as compiled_one_by_one:
        _compile(loaded, column_wise=False)
    assert str(compiled_by_runs.value) == str(compiled_one_by_one.value)
    assert str(compiled_by_runs.value).count("70 rules apply to") == 4  # two networks, TCP and UDP


def test_too_many_who_classes_are_the_same_error(tmp_path: Path) -> None:
    """The class of rules without 'who' comes first here, made by a run."""
    block = [{"name": f"b{i}", "action": "deny", "direction": "egress", "to": [f"10.0.0.{i}"]} for i in range(10)]
    who = [
        {"name": f"w{i}", "action": "allow", "direction": "egress", "who": {"user": [i]}, "to": [f"10.1.{i}.0/24"]}
        for i in range(65)
    ]
    loaded = load(tmp_path, [([*block, *who], False)])
    with pytest.raises(PolicyError) as by_runs:
        _compile(loaded)
    with pytest.raises(PolicyError) as one_by_one:
        _compile(loaded, column_wise=False)
    assert str(by_runs.value) == str(one_by_one.value)
    assert "66 distinct 'who' selections" in str(by_runs.value)
