"""Outbound decisions for real: TCP v4/v6, connected and unconnected UDP, v4-mapped IPv6, DNS to port 53."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from loaders import abi
from pipeline.decode import ConnRecord
from tests.kernel.kernel_harness import CHILD_COMM, Harness

pytestmark = pytest.mark.kernel

ALLOW_PORT = 40001
DENY_PORT = 40002
DNS_QUERY = "abcd01000001000000000000076578616d706c6503636f6d0000010001"


@dataclass(frozen=True)
class Case:
    """One outbound path: how the child reaches the destination and how the policy names it."""

    name: str
    family: int
    sock_type: int
    addr: str
    rule_addr: str
    protocol: str
    shown_addr: str


CASES = [
    Case("tcp4", socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", "127.0.0.1", "tcp", "127.0.0.1"),
    Case("tcp6", socket.AF_INET6, socket.SOCK_STREAM, "::1", "::1", "tcp", "::1"),
    Case("udp4-connected", socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", "127.0.0.1", "udp", "127.0.0.1"),
    Case("udp6-connected", socket.AF_INET6, socket.SOCK_DGRAM, "::1", "::1", "udp", "::1"),
    Case(
        "v4-mapped", socket.AF_INET6, socket.SOCK_STREAM, "::ffff:127.0.0.1", "127.0.0.1", "tcp", "127.0.0.1"
    ),
]


@pytest.fixture
def listeners() -> Iterator[None]:
    """TCP listeners (in the test process, outside the cgroup) on the allowed port, v4 and v6."""
    socks = []
    for fam, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, ALLOW_PORT))
        s.listen(64)
        socks.append(s)
    try:
        yield
    finally:
        for s in socks:
            s.close()


def policy_for(case: Case) -> list[dict[str, object]]:
    return [
        {"name": "allow-it", "action": "allow", "direction": "egress", "to": [case.rule_addr],
         "ports": [ALLOW_PORT], "protocol": case.protocol},
        {"name": "deny-it", "action": "deny", "direction": "egress", "to": [case.rule_addr],
         "ports": [DENY_PORT], "protocol": case.protocol},
    ]  # fmt: skip


def one(records: list[ConnRecord], port: int) -> ConnRecord:
    found = [r for r in records if r.remote_port == port]
    assert len(found) == 1, records
    return found[0]


def check_event(
    r: ConnRecord, case: Case, pid: int, port: int, kind: int, verdict: int, rule: int, gen: int
) -> None:
    assert r.kind == kind
    assert (r.task.pid, r.task.tgid, r.task.uid, r.task.comm) == (pid, pid, 0, CHILD_COMM)
    assert r.remote_addr == case.shown_addr
    assert r.remote_port == port
    assert r.family == case.family
    assert r.protocol == (socket.IPPROTO_TCP if case.protocol == "tcp" else socket.IPPROTO_UDP)
    assert r.direction == abi.DIR_EGRESS
    assert (r.verdict, r.rule_id, r.policy_gen) == (verdict, rule, gen)
    assert not r.flags & abi.F_UNKNOWN


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_connect_allowed_denied_and_detect(h: Harness, listeners: None, case: Case) -> None:
    """Allowed connects go through, denied ones get EPERM in prevent and pass as would-block in detect."""
    compiled, gen = h.apply(policy_for(case))
    allow_id, deny_id = compiled.rule_id("allow-it"), compiled.rule_id("deny-it")
    ops = [("connect", case.family, case.sock_type, case.addr, p, 2.0) for p in (ALLOW_PORT, DENY_PORT)]

    child = h.run(ops)
    allowed_result = "ok"
    assert child.results == [allowed_result, "EPERM"], child.stderr
    events = h.conns(child.pid, abi.EV_CONNECT)
    check_event(
        one(events, ALLOW_PORT), case, child.pid, ALLOW_PORT, abi.EV_CONNECT, abi.VERDICT_ALLOW, allow_id, gen
    )
    blocked = one(events, DENY_PORT)
    check_event(blocked, case, child.pid, DENY_PORT, abi.EV_CONNECT, abi.VERDICT_BLOCK, deny_id, gen)
    assert (blocked.mode, blocked.action) == (abi.MODE_PREVENT, abi.ACT_DENY)

    h.sensors.set_mode("detect")
    child = h.run(ops)
    assert child.results[1] != "EPERM", child.results
    would = one(h.conns(child.pid, abi.EV_CONNECT), DENY_PORT)
    check_event(would, case, child.pid, DENY_PORT, abi.EV_CONNECT, abi.VERDICT_WOULD_BLOCK, deny_id, gen)
    assert would.mode == abi.MODE_DETECT


@pytest.mark.parametrize(
    ("family", "addr"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["v4", "v6"]
)
def test_unconnected_udp_sendto_and_dns(h: Harness, family: int, addr: str) -> None:
    """sendto() without connect() is decided per datagram: DNS to port 53 allowed, another port refused."""
    compiled, gen = h.apply(
        [
            {"name": "dns", "action": "allow", "direction": "egress", "to": [addr], "ports": ["dns"],
             "protocol": "udp"},
            {"name": "no-udp", "action": "deny", "direction": "egress", "to": [addr], "ports": [DENY_PORT],
             "protocol": "udp"},
        ]
    )  # fmt: skip
    ops = [("sendto", family, addr, 53, 1, DNS_QUERY), ("sendto", family, addr, DENY_PORT, 1, "00")]
    child = h.run(ops)
    assert child.results == ["ok", "EPERM"], child.stderr
    events = h.conns(child.pid, abi.EV_SENDMSG)
    dns, denied = one(events, 53), one(events, DENY_PORT)
    assert (dns.verdict, dns.rule_id, dns.protocol, dns.remote_addr) == (
        abi.VERDICT_ALLOW, compiled.rule_id("dns"), socket.IPPROTO_UDP, addr,
    )  # fmt: skip
    assert (denied.verdict, denied.rule_id, denied.policy_gen) == (
        abi.VERDICT_BLOCK,
        compiled.rule_id("no-udp"),
        gen,
    )
    assert denied.task.tgid == child.pid and denied.sock_type == socket.SOCK_DGRAM

    h.sensors.set_mode("detect")
    child = h.run(ops)
    assert child.results == ["ok", "ok"]
    denied = one(h.conns(child.pid, abi.EV_SENDMSG), DENY_PORT)
    assert (denied.verdict, denied.rule_id) == (abi.VERDICT_WOULD_BLOCK, compiled.rule_id("no-udp"))


def test_default_decides_unmatched_flow(h: Harness) -> None:
    """No rule matches: the (mode, direction) default decides, rule_id 0, flagged unknown."""
    _, gen = h.apply([], defaults={"detect": "alert", "prevent": {"egress": "deny"}})
    child = h.run([("connect", socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", DENY_PORT, 1.0)])
    assert child.results == ["EPERM"]
    (r,) = h.conns(child.pid, abi.EV_CONNECT)
    assert (r.verdict, r.rule_id, r.policy_gen, r.action) == (abi.VERDICT_BLOCK, 0, gen, abi.ACT_DENY)
    assert r.flags & abi.F_UNKNOWN and r.flags & abi.F_V4

    h.sensors.set_mode("detect")
    child = h.run([("connect", socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", DENY_PORT, 1.0)])
    assert child.results == ["ok"]
    (r,) = h.conns(child.pid, abi.EV_CONNECT)
    assert (r.verdict, r.rule_id, r.action) == (abi.VERDICT_ALERT, 0, abi.ACT_ALERT)


def test_mode_switch_at_runtime_without_reload(h: Harness) -> None:
    """set_mode flips prevent/detect on the loaded object: same policy generation, different outcome."""
    _, gen = h.apply([{"name": "deny", "action": "deny", "direction": "egress", "to": ["127.0.0.1"]}])
    prog_fds = {name: link for name, link in h.sensors.links.items()}
    op = ("connect", socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", DENY_PORT, 1.0)
    outcomes = []
    for mode in ("prevent", "detect", "prevent", "detect"):
        h.sensors.set_mode(mode)
        child = h.run([op])
        (r,) = h.conns(child.pid, abi.EV_CONNECT)
        outcomes.append((child.results[0], r.verdict, r.mode, r.policy_gen))
    assert (
        outcomes
        == [
            ("EPERM", abi.VERDICT_BLOCK, abi.MODE_PREVENT, gen),
            ("ok", abi.VERDICT_WOULD_BLOCK, abi.MODE_DETECT, gen),
        ]
        * 2
    )
    assert h.sensors.generation == gen and h.sensors.links == prog_fds
