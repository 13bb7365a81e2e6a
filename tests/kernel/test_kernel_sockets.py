"""Inbound, listening, raw and packet sockets for real: accepted, dropped, refused or killed."""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator

import pytest

from loaders import abi
from pipeline.decode import ConnRecord
from tests.kernel.kernel_harness import PYTHON, Harness, free_port, read_line

pytestmark = pytest.mark.kernel

SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(8)
s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
try:
    c, _ = s.accept()
    c.close()
    print("accepted", flush=True)
except OSError:
    print("no-connection", flush=True)
"""
ETH_P_ALL, ETH_P_IP = 0x0003, 0x0800


@pytest.fixture
def server_port() -> int:
    return free_port()


def serve(h: Harness, port: int, accept_timeout: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [PYTHON, "-c", SERVER, str(port), str(accept_timeout)],
        preexec_fn=h.preexec(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert read_line(proc.stdout, 10) == "ready", proc.stderr
    return proc


@pytest.fixture
def servers() -> Iterator[list[subprocess.Popen[str]]]:
    """Server processes started by a test, killed and reaped whatever happens."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=10)


def client_connect(port: int, timeout: float) -> str:
    """Connect from the test process (outside the cgroup) and report the outcome."""
    with socket.socket() as c:
        c.settimeout(timeout)
        try:
            c.connect(("127.0.0.1", port))
        except TimeoutError:
            return "timeout"
        except OSError as exc:
            return str(exc)
        return "connected"


def inbound_policy(action: str, port: int) -> list[dict[str, object]]:
    return [
        {"name": "may-listen", "action": "allow", "direction": "listen", "ports": [port], "protocol": "tcp"},
        {"name": "inbound", "action": action, "direction": "ingress", "from": ["127.0.0.1"], "ports": [port],
         "protocol": "tcp"},
    ]  # fmt: skip


def test_inbound_allowed_is_reported_on_accept(
    h: Harness, server_port: int, servers: list[subprocess.Popen[str]]
) -> None:
    """A client reaches a listener in the cgroup; the accepted connection is reported (kind 4)."""
    compiled, gen = h.apply(inbound_policy("allow", server_port))
    srv = serve(h, server_port, 10)
    servers.append(srv)
    assert client_connect(server_port, 5) == "connected"
    assert read_line(srv.stdout, 10) == "accepted"
    srv.wait(10)
    events = h.conns(srv.pid)
    (bind,) = [r for r in events if r.kind == abi.EV_BIND]
    assert (bind.direction, bind.local_port, bind.verdict, bind.rule_id) == (
        abi.DIR_LISTEN, server_port, abi.VERDICT_ALLOW, compiled.rule_id("may-listen"),
    )  # fmt: skip
    (acc,) = [r for r in events if r.kind == abi.EV_ACCEPT]
    assert (acc.direction, acc.local_port, acc.local_addr, acc.remote_addr) == (
        abi.DIR_INGRESS, server_port, "127.0.0.1", "127.0.0.1",
    )  # fmt: skip
    assert (acc.verdict, acc.rule_id, acc.task.tgid) == (
        abi.VERDICT_ALLOW,
        compiled.rule_id("inbound"),
        srv.pid,
    )
    assert acc.flags & abi.F_NO_TASK and acc.remote_port > 0 and acc.policy_gen in (0, gen)


ECHO_SERVER = r"""
import socket, sys
family = socket.AF_INET6 if sys.argv[2] == "6" else socket.AF_INET
s = socket.socket(family)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[3], int(sys.argv[1])))
s.listen(8)
print("ready", flush=True)
for _ in range(int(sys.argv[4])):
    c, _ = s.accept()
    for _ in range(3):
        c.sendall(c.recv(64))
    c.close()
print("done", flush=True)
"""


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
def test_one_accept_event_per_connection_without_folding(
    h: Harness, servers: list[subprocess.Popen[str]], family: int
) -> None:
    """With folding off, each accepted connection gives exactly one accept event; its later packets none."""
    addr = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    port = free_port(family)
    compiled, gen = h.apply([
        {"name": "may-listen", "action": "allow", "direction": "listen", "ports": [port], "protocol": "tcp"},
        {"name": "inbound", "action": "allow", "direction": "ingress", "from": [addr], "ports": [port],
         "protocol": "tcp"},
    ])  # fmt: skip
    cfg = h.sensors.maps["config"]
    key = abi.CFG_FLOW_INTERVAL_MS.to_bytes(4, "little")
    saved = cfg.lookup(key)
    assert saved is not None
    cfg.update(key, (0).to_bytes(4, "little"))
    try:
        n = 3
        srv = subprocess.Popen(
            [PYTHON, "-c", ECHO_SERVER, str(port), "6" if family == socket.AF_INET6 else "4", addr, str(n)],
            preexec_fn=h.preexec(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        servers.append(srv)
        assert read_line(srv.stdout, 10) == "ready", srv.stderr
        client_ports = []
        for _ in range(n):
            with socket.create_connection((addr, port), timeout=5) as c:
                client_ports.append(c.getsockname()[1])
                for i in range(3):  # established traffic: ACKs and data to the accepted socket
                    c.sendall(b"x" * (i + 1))
                    assert c.recv(64) == b"x" * (i + 1)
        assert read_line(srv.stdout, 10) == "done"
        srv.wait(10)
    finally:
        cfg.update(key, saved)
    accepts = h.conns(srv.pid, abi.EV_ACCEPT)
    assert sorted(r.remote_port for r in accepts) == sorted(client_ports)
    for r in accepts:
        assert (r.direction, r.local_port, r.local_addr, r.remote_addr) == (abi.DIR_INGRESS, port, addr, addr)
        assert (r.verdict, r.rule_id, r.policy_gen, r.repeat) == (
            abi.VERDICT_ALLOW, compiled.rule_id("inbound"), gen, 0,
        )  # fmt: skip
        assert r.flags & abi.F_NO_TASK
        assert bool(r.flags & abi.F_V4) == (family == socket.AF_INET)


def test_inbound_denied_syn_is_dropped(
    h: Harness, server_port: int, servers: list[subprocess.Popen[str]]
) -> None:
    """A denied inbound SYN is dropped: the client times out and a blocked inbound event (kind 3) appears."""
    compiled, gen = h.apply(inbound_policy("deny", server_port))
    srv = serve(h, server_port, 0.1)
    servers.append(srv)
    # The server stops accepting quickly; the listen socket stays open until it exits, so wait on the
    # drop, not on the server.
    srv_port_client = client_connect(server_port, 0.7)
    assert srv_port_client == "timeout"
    srv.communicate(timeout=10)
    events = [r for r in h.conns(srv.pid) if r.kind == abi.EV_INBOUND]
    assert events, "no inbound event"
    r = events[0]
    assert (r.verdict, r.rule_id, r.policy_gen, r.direction) == (
        abi.VERDICT_BLOCK, compiled.rule_id("inbound"), gen, abi.DIR_INGRESS,
    )  # fmt: skip
    assert (r.local_port, r.remote_addr, r.task.tgid) == (server_port, "127.0.0.1", srv.pid)
    assert not [r for r in h.drain() if isinstance(r, ConnRecord) and r.kind == abi.EV_ACCEPT]


def test_inbound_denied_in_detect_passes_as_would_block(
    h: Harness, server_port: int, servers: list[subprocess.Popen[str]]
) -> None:
    """Detect mode lets the denied connection through and reports it would-block."""
    compiled, _ = h.apply(inbound_policy("deny", server_port))
    h.sensors.set_mode("detect")
    srv = serve(h, server_port, 10)
    servers.append(srv)
    assert client_connect(server_port, 5) == "connected"
    assert read_line(srv.stdout, 10) == "accepted"
    srv.wait(10)
    events = [r for r in h.conns(srv.pid) if r.direction == abi.DIR_INGRESS]
    assert events and all(
        (r.verdict, r.rule_id) == (abi.VERDICT_WOULD_BLOCK, compiled.rule_id("inbound")) for r in events
    )


def test_listen_refused_and_ephemeral_bind_allowed(h: Harness) -> None:
    """bind() to a port is a listen decision (kind 5), refused by a deny rule; bind to port 0 never is."""
    port = free_port()
    compiled, gen = h.apply(
        [{"name": "no-listen", "action": "deny", "direction": "listen", "ports": [port], "protocol": "tcp"}],
        defaults={"detect": "alert", "prevent": {"listen": "allow", "egress": "deny"}},
    )
    ops = [("bind", socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", port),
           ("bind", socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", 0)]  # fmt: skip
    child = h.run(ops)
    assert child.results[0] == "EPERM" and child.results[1].startswith("ok:"), child.results
    (r,) = h.conns(child.pid, abi.EV_BIND)
    assert (r.direction, r.local_port, r.local_addr, r.verdict, r.rule_id, r.policy_gen) == (
        abi.DIR_LISTEN, port, "127.0.0.1", abi.VERDICT_BLOCK, compiled.rule_id("no-listen"), gen,
    )  # fmt: skip

    h.sensors.set_mode("detect")
    child = h.run(ops[:1])
    assert child.results == [f"ok:{port}"]
    (r,) = h.conns(child.pid, abi.EV_BIND)
    assert r.verdict == abi.VERDICT_WOULD_BLOCK


RAW_DENY = [{"name": "no-raw", "action": "deny", "direction": "raw"}]


def test_raw_inet_socket_refused(h: Harness) -> None:
    """socket(AF_INET, SOCK_RAW, ICMP) is decided at creation: EPERM in prevent, would-block in detect."""
    compiled, gen = h.apply(RAW_DENY)
    op = ("socket", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    child = h.run([op])
    assert child.results == ["EPERM"]
    (r,) = h.conns(child.pid, abi.EV_SOCKET)
    assert (r.family, r.protocol, r.sock_type, r.direction) == (
        socket.AF_INET, socket.IPPROTO_ICMP, socket.SOCK_RAW, abi.DIR_RAW,
    )  # fmt: skip
    assert (r.verdict, r.rule_id, r.policy_gen) == (abi.VERDICT_BLOCK, compiled.rule_id("no-raw"), gen)

    h.sensors.set_mode("detect")
    child = h.run([op])
    assert child.results == ["ok"]
    (r,) = h.conns(child.pid, abi.EV_SOCKET)
    assert r.verdict == abi.VERDICT_WOULD_BLOCK


@pytest.mark.parametrize("ethertype", [ETH_P_ALL, ETH_P_IP], ids=["all", "ip"])
def test_packet_socket_killed(h: Harness, ethertype: int) -> None:
    """AF_PACKET bypasses cgroup hooks: the tracepoint sees it and, denied in prevent, SIGKILLs the caller."""
    if "tool_packet_socket" in h.sensors.missing:
        pytest.fail(f"packet socket sensor missing: {h.sensors.missing['tool_packet_socket']}")
    compiled, gen = h.apply(RAW_DENY)
    op = ("socket", socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
    child = h.run([op])
    assert child.returncode == -signal.SIGKILL
    (r,) = h.conns(child.pid, abi.EV_SOCKET)
    assert r.flags & abi.F_PACKET and r.flags & abi.F_KILLED
    assert (r.family, r.remote_port, r.verdict, r.rule_id, r.policy_gen) == (
        socket.AF_PACKET, ethertype, abi.VERDICT_BLOCK, compiled.rule_id("no-raw"), gen,
    )  # fmt: skip

    h.sensors.set_mode("detect")
    child = h.run([op])
    assert (child.returncode, child.results) == (0, ["ok"])
    (r,) = h.conns(child.pid, abi.EV_SOCKET)
    assert r.verdict == abi.VERDICT_WOULD_BLOCK and not r.flags & abi.F_KILLED
