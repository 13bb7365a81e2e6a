"""The reference evaluator: the precedence table, verdicts per mode, who matching, and invariants."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.policy import CompiledPolicy, Flow, compile_policy, evaluate, load_policy

Write = Callable[..., Path]

PRECEDENCE = """\
  defaults: {detect: alert, prevent: {egress: deny, ingress: allow}}
  rules:
    - {name: allow-all, action: allow, direction: egress}
    - {name: alert-web, action: alert, direction: egress, ports: [80, 443]}
    - {name: audit-443, action: deny, audit: true, direction: egress, ports: [443]}
    - {name: deny-evil, action: deny, direction: egress, to: [203.0.113.0/24]}
    - {name: allow-evil, action: allow, direction: egress, to: [203.0.113.0/24]}
    - {name: nginx-db, action: allow, direction: egress, who: {exe: [/usr/sbin/nginx], user: [33]},
       to: [10.0.0.5], ports: [postgres], protocol: tcp}
    - {name: deny-db-others, action: deny, direction: ingress, from: ["2001:db8::/32"], ports: ["5000-5999"]}
    - {name: units, action: alert, direction: listen, who: {unit: [web.service]}, bind: [0.0.0.0/0]}
    - {name: raw, action: deny, direction: raw, who: {comm: ["tcpdump"]}}
"""


@pytest.fixture
def compiled(write_policy: Write) -> CompiledPolicy:
    return compile_policy(load_policy([write_policy(PRECEDENCE)]))


@pytest.mark.parametrize(
    ("flow", "mode", "verdict", "rule"),
    [
        (Flow("egress", "tcp", "198.51.100.1", 22), "prevent", "allowed", "allow-all"),
        (Flow("egress", "tcp", "198.51.100.1", 80), "prevent", "alert", "alert-web"),
        (Flow("egress", "tcp", "198.51.100.1", 443), "prevent", "would-block", "audit-443"),
        (Flow("egress", "tcp", "203.0.113.9", 443), "prevent", "blocked", "deny-evil"),
        (Flow("egress", "tcp", "203.0.113.9", 443), "detect", "would-block", "deny-evil"),
        (
            Flow("egress", "udp", "10.0.0.5", 5432, exe="/usr/sbin/nginx", uid=33),
            "prevent",
            "allowed",
            "allow-all",
        ),
        (Flow("ingress", "tcp", "2001:db8::7", 5432), "prevent", "blocked", "deny-db-others"),
        (Flow("ingress", "tcp", "2001:db9::7", 5432), "prevent", "allowed", ""),
        (Flow("ingress", "tcp", "2001:db9::7", 5432), "detect", "alert", ""),
        (
            Flow("listen", "tcp", "0.0.0.0", 8080, cgroup="system.slice/web.service"),
            "prevent",
            "alert",
            "units",
        ),
        (
            Flow("listen", "tcp", "0.0.0.0", 8080, cgroup="system.slice/other.service"),
            "prevent",
            "blocked",
            "",
        ),
        (Flow("listen", "tcp", "::", 8080, cgroup="system.slice/web.service"), "prevent", "blocked", ""),
        (Flow("raw", 3, comm="tcpdump"), "prevent", "blocked", "raw"),
        (Flow("raw", 3, comm="ping"), "prevent", "blocked", ""),
        (Flow("raw", 3, comm="ping"), "detect", "alert", ""),
    ],
)
def test_precedence_table(compiled: CompiledPolicy, flow: Flow, mode: str, verdict: str, rule: str) -> None:
    decision = evaluate(compiled, flow, mode)
    assert (decision.verdict, decision.rule_name) == (verdict, rule)
    assert decision.known == bool(rule)
    assert (decision.rule_id == 0) == (rule == "")


def test_who_conditions_and_across_dimensions(compiled: CompiledPolicy) -> None:
    rid = compiled.rule_id("nginx-db")
    hits = [e for e in compiled.entries if e.rule_id == rid]
    assert {(e.protocol, e.port_lo, e.port_hi) for e in hits} == {(6, 5432, 5432)}
    cls = compiled.who_classes[hits[0].who_class]
    assert cls.exe == ["/usr/sbin/nginx"] and cls.uid == [33] and cls.comm is None


def test_ipv4_is_v4_mapped_and_any_is_two_protocols(compiled: CompiledPolicy) -> None:
    rid = compiled.rule_id("deny-evil")
    assert {str(e.network) for e in compiled.entries if e.rule_id == rid} == {"::ffff:cb00:7100/120"}
    assert sorted(e.protocol for e in compiled.entries if e.rule_id == rid) == [6, 17]


def test_unit_and_container_become_cgroup_globs(write_policy: Write) -> None:
    path = write_policy(
        "  rules:\n    - {name: a, action: allow, direction: egress, who: {unit: [x.service], "
        "container: [abcdef12], cgroup: [/kubepods.slice]}}\n"
    )
    [cls] = compile_policy(load_policy([path])).who_classes
    assert cls.cgroup == ["**/*abcdef12*", "**/x.service", "kubepods.slice"]


def test_rule_explanation_is_plain(write_policy: Write) -> None:
    path = write_policy(
        "  rules:\n    - {name: a, action: allow, direction: egress, who: {exe: [/usr/sbin/nginx]}, "
        "to: [10.0.0.5], ports: [5432], protocol: tcp}\n"
    )
    info = compile_policy(load_policy([path])).rules[1]
    assert info.explanation == "allow nginx (/usr/sbin/nginx) to connect to 10.0.0.5 port 5432/tcp"
    assert info.source.endswith("policy.yaml:6")


ACTIONS = st.sampled_from(["allow", "alert", "deny", "audit"])
RULE = st.tuples(
    ACTIONS,
    st.sampled_from(["10.0.0.0/8", "10.1.0.0/16", "any", "192.0.2.1"]),
    st.integers(1, 3),
    st.sampled_from(["tcp", "udp", "any"]),
)


def _policy(tmp: Path, rules: list[tuple[str, str, int, str]], audit_mode: bool) -> CompiledPolicy:
    lines = []
    for i, (action, to, port, proto) in enumerate(rules):
        audit = ", audit: true" if action == "audit" else ""
        real = "deny" if action == "audit" else action
        lines.append(
            f"    - {{name: r{i}, action: {real}{audit}, direction: egress, to: [{to}], ports: [{port}], "
            f"protocol: {proto}}}\n"
        )
    path = tmp / "p.yaml"
    mode = "audit" if audit_mode else "enforce"
    path.write_text(
        "apiVersion: tool/v1\nkind: Policy\nmetadata: {name: h}\nspec:\n"
        f"  mode: {mode}\n  rules:\n" + ("".join(lines) or "    []\n")
    )
    return compile_policy(load_policy([path]))


FLOWS = st.builds(
    lambda a, p, pr: Flow("egress", pr, a, p),
    st.sampled_from(["10.0.0.1", "10.1.2.3", "192.0.2.1", "198.51.100.1", "::1"]),
    st.integers(1, 3),
    st.sampled_from(["tcp", "udp"]),
)


@settings(max_examples=150, deadline=None)
@given(rules=st.lists(RULE, max_size=6), audit_mode=st.booleans(), flow=FLOWS)
def test_invariants(
    tmp_path_factory: pytest.TempPathFactory,
    rules: list[tuple[str, str, int, str]],
    audit_mode: bool,
    flow: Flow,
) -> None:
    """Detect never blocks; a matching enforced deny always blocks in prevent; the reported rule matches."""
    compiled = _policy(tmp_path_factory.mktemp("h"), rules, audit_mode)
    detect, prevent = evaluate(compiled, flow, "detect"), evaluate(compiled, flow, "prevent")
    assert detect.verdict != "blocked"
    assert detect.rule_id == prevent.rule_id
    matching = [
        i + 1
        for i, (_, to, port, proto) in enumerate(rules)
        if port == flow.port
        and proto in ("any", flow.protocol)
        and (to == "any" or (flow.remote_addr != "::1" and _in(flow.remote_addr, to)))
    ]
    actions = {i: rules[i - 1][0] for i in matching}
    if any(a == "deny" for a in actions.values()) and not audit_mode:
        assert prevent.verdict == "blocked"
        assert prevent.rule_id == min(i for i, a in actions.items() if a == "deny")
    if not matching:
        assert not prevent.known and prevent.rule_id == 0
    else:
        assert prevent.rule_id in matching


def _in(addr: str, net: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(addr) in ipaddress.ip_network(net)
