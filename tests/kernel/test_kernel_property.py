"""The kernel decides exactly as the reference evaluator: random policies, random flows, both modes."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loaders import abi
from pipeline.decode import VERDICT_NAMES, ConnRecord
from pipeline.policy import Flow, evaluate
from tests.kernel.kernel_harness import CHILD_COMM, REAL_PYTHON, Harness

pytestmark = pytest.mark.kernel

# Nested prefixes so that the kernel's walk from the most specific node outwards is exercised.
V4_NETS = ["127.0.0.0/8", "127.1.0.0/16", "127.1.2.0/24", "127.1.2.3", "127.1.2.4/31", "127.2.0.0/15", "any"]
V6_NETS = ["::1", "::/127", "::/64", "2001:db8::/32", "2001:db8:1::/48", "2001:db8:1::7"]
V4_ADDRS = ["127.0.0.1", "127.1.2.3", "127.1.2.4", "127.1.2.5", "127.1.9.9", "127.2.0.1", "127.3.0.1"]
V6_ADDRS = ["::1", "2001:db8:1::7", "2001:db8:1::8", "2001:db8:2::1", "::ffff:127.1.2.3"]
PORTS = list(range(41000, 41006))
COMM = "tool-prop"


def port_spec(lo: int, width: int) -> int | str:
    return lo if width == 0 else f"{lo}-{lo + width}"


@st.composite
def rules(draw: st.DrawFn, cgroup_rel: str) -> dict[str, Any]:
    action = draw(st.sampled_from(["allow", "deny", "alert"]))
    rule: dict[str, Any] = {"action": action, "direction": "egress"}
    if action == "deny" and draw(st.booleans()):
        rule["audit"] = True
    if draw(st.integers(0, 4)):
        rule["to"] = draw(st.lists(st.sampled_from(V4_NETS + V6_NETS), min_size=1, max_size=3, unique=True))
    if draw(st.booleans()):
        rule["ports"] = draw(
            st.lists(st.builds(port_spec, st.sampled_from(PORTS), st.integers(0, 2)), min_size=1, max_size=2)
        )
    rule["protocol"] = draw(st.sampled_from(["tcp", "udp", "any"]))
    who = draw(
        st.sampled_from(
            [None, {"user": [0]}, {"user": [65534]}, {"comm": [COMM]}, {"comm": ["other"]},
             {"cgroup": [cgroup_rel]}, {"cgroup": [cgroup_rel + "/nowhere"]}, {"exe": [REAL_PYTHON]},
             {"user": [0], "comm": [COMM]}]
        )
    )  # fmt: skip
    if who is not None:
        rule["who"] = who
    return rule


FLOWS = st.lists(
    st.tuples(st.sampled_from(V4_ADDRS + V6_ADDRS), st.sampled_from(PORTS), st.sampled_from(["tcp", "udp"])),
    min_size=1,
    max_size=12,
    unique=True,
)
DEFAULTS = st.sampled_from(
    [{"detect": "alert", "prevent": "deny"}, {"detect": "allow", "prevent": "alert"},
     {"detect": "deny", "prevent": {"egress": "allow"}}]
)  # fmt: skip


def connect_op(addr: str, port: int, proto: str) -> tuple[Any, ...]:
    family = socket.AF_INET if "." in addr and ":" not in addr else socket.AF_INET6
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    return ("connect", family, kind, addr, port, 0.5)


def shown(addr: str) -> str:
    return addr.removeprefix("::ffff:")


def test_kernel_matches_reference_evaluator(harness: Harness) -> None:
    """Random policies and flows from a child in the cgroup: kernel verdict and rule equal evaluate()."""
    h = harness

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(
        policy=st.lists(rules(h.cgroup_rel), min_size=0, max_size=6),
        flows=FLOWS,
        defaults=DEFAULTS,
    )
    def check(
        policy: list[dict[str, Any]], flows: list[tuple[str, int, str]], defaults: dict[str, Any]
    ) -> None:
        for i, rule in enumerate(policy):
            rule["name"] = f"r{i}"
        compiled, gen = h.apply(policy, defaults=defaults)
        ops = [("comm", COMM)] + [connect_op(*f) for f in flows]
        for mode in ("prevent", "detect"):
            h.sensors.set_mode(mode)
            h.drain()
            child = h.run(ops)
            events = {
                (r.remote_addr, r.remote_port, r.protocol): r
                for r in h.conns(child.pid)
                if isinstance(r, ConnRecord) and r.kind == abi.EV_CONNECT
            }
            for (addr, port, proto), result in zip(flows, child.results[1:], strict=True):
                want = evaluate(
                    compiled,
                    Flow("egress", proto, addr, port, exe=REAL_PYTHON, comm=COMM, uid=0, gid=0,
                         cgroup=h.cgroup_rel),
                    mode,
                )  # fmt: skip
                got = events.get(
                    (shown(addr), port, socket.IPPROTO_TCP if proto == "tcp" else socket.IPPROTO_UDP)
                )
                assert got is not None, (addr, port, proto, mode, events.keys())
                assert (VERDICT_NAMES[got.verdict], got.rule_id) == (want.verdict, want.rule_id), (
                    f"{mode} {proto} {addr}:{port} policy={policy} defaults={defaults}"
                )
                assert got.policy_gen == gen and got.task.comm == COMM
                assert (result == "EPERM") == (want.verdict == "blocked"), (result, want)
        h.sensors.set_mode("prevent")

    assert CHILD_COMM  # the child renames itself, so the default comm never matches by accident
    check()
