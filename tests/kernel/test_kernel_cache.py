"""The walk result cached in a flow's entry: never outlives a policy swap, a mode switch or a change of who asks."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from loaders import abi
from tests.kernel.kernel_harness import NOBODY, PYTHON, REAL_PYTHON, Harness, SubCgroups, free_port, read_line

pytestmark = pytest.mark.kernel

PORT = 40031
U32 = struct.Struct("<I")

# One long-lived process: reads one JSON operation per line, prints one result per line. The flow key
# holds the process (tgid, exec_id), so every decision of this child can find the walk cached by the
# previous one.
STEPPER = r"""
import errno, json, os, socket, sys
for line in sys.stdin:
    op = json.loads(line)
    try:
        if op[0] == "connect":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.connect(("127.0.0.1", op[1]))
            finally:
                s.close()
        elif op[0] == "comm":
            with open("/proc/self/comm", "w") as f:
                f.write(op[1])
        elif op[0] == "setuid":
            os.setgroups([])
            os.setgid(op[1])
            os.setuid(op[1])
        elif op[0] == "cgroup":
            with open(os.path.join(op[1], "cgroup.procs"), "w") as f:
                f.write("0\n")
        print("ok", flush=True)
    except OSError as exc:
        print(errno.errorcode.get(exc.errno, "E?"), flush=True)
"""


class Stepper:
    """A child in the scratch cgroup that performs one operation per call."""

    def __init__(self, h: Harness) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "-c", STEPPER], preexec_fn=h.preexec(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    def __call__(self, *op: Any) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(list(op)) + "\n")
        self.proc.stdin.flush()
        return read_line(self.proc.stdout, 10)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture
def child(h: Harness) -> Iterator[Stepper]:
    c = Stepper(h)
    try:
        yield c
    finally:
        if c.proc.poll() is None:
            c.proc.kill()
        c.close()


def rule(action: str, who: dict[str, Any] | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {"name": action, "action": action, "direction": "egress", "to": ["127.0.0.1"],
                         "ports": [PORT], "protocol": "udp"}  # fmt: skip
    if who is not None:
        r["who"] = who
    return r


def test_cached_walk_is_dropped_by_policy_swap_and_mode_switch(h: Harness, child: Stepper) -> None:
    """One process, one flow: each swap and each mode switch decides anew, with no folded stale verdict."""
    allow, gen_a = h.apply([rule("allow")])
    assert [child("connect", PORT) for _ in range(3)] == ["ok"] * 3  # the later two hit the cache
    deny, gen_b = h.apply([rule("deny")])
    assert child("connect", PORT) == "EPERM"
    h.sensors.set_mode("detect")
    assert child("connect", PORT) == "ok"
    h.sensors.set_mode("prevent")
    assert child("connect", PORT) == "EPERM"
    _, gen_c = h.apply([rule("allow")])
    assert child("connect", PORT) == "ok"

    seen = [(r.policy_gen, r.verdict, r.mode, r.rule_id) for r in h.conns(child.proc.pid, abi.EV_CONNECT)]
    assert seen == [
        (gen_a, abi.VERDICT_ALLOW, abi.MODE_PREVENT, allow.rule_id("allow")),
        (gen_b, abi.VERDICT_BLOCK, abi.MODE_PREVENT, deny.rule_id("deny")),
        (gen_b, abi.VERDICT_WOULD_BLOCK, abi.MODE_DETECT, deny.rule_id("deny")),
        (gen_b, abi.VERDICT_BLOCK, abi.MODE_PREVENT, deny.rule_id("deny")),
        (gen_c, abi.VERDICT_ALLOW, abi.MODE_PREVENT, allow.rule_id("allow")),
    ]


def test_cached_walk_follows_a_uid_change_within_the_process(h: Harness, child: Stepper) -> None:
    """A user rule: the same process is refused as root, then allowed once it runs as nobody."""
    h.apply([rule("allow", {"user": [NOBODY]})])
    assert [child("connect", PORT), child("connect", PORT)] == ["EPERM", "EPERM"]
    assert child("setuid", NOBODY) == "ok"
    assert child("connect", PORT) == "ok"


def test_cached_walk_follows_a_comm_change_within_the_process(h: Harness, child: Stepper) -> None:
    """A comm rule: renaming the process back and forth flips the decision every time."""
    h.apply([rule("allow", {"comm": ["tool-cache-ok"]})])
    steps = []
    for name in ("tool-cache-no", "tool-cache-ok", "tool-cache-no", "tool-cache-ok"):
        assert child("comm", name) == "ok"
        steps.append((child("connect", PORT), child("connect", PORT)))
    assert steps == [("EPERM", "EPERM"), ("ok", "ok")] * 2


def test_cached_walk_follows_a_cgroup_move_within_the_process(h: Harness, child: Stepper) -> None:
    """A cgroup rule: the same process is allowed in the named child cgroup only, in and out again."""
    subs = SubCgroups(h.cgroup_path)
    try:
        inner = subs.make("inner")
        h.apply([rule("allow", {"cgroup": [f"{h.cgroup_rel}/inner"]})])
        steps = []
        for where in (h.cgroup_path, inner, h.cgroup_path):
            assert child("cgroup", where) == "ok"
            steps.append((child("connect", PORT), child("connect", PORT)))
        assert steps == [("EPERM", "EPERM"), ("ok", "ok"), ("EPERM", "EPERM")]
        assert child("cgroup", h.cgroup_path) == "ok"  # leave `inner` empty so it can be removed
    finally:
        subs.cleanup()


def test_folded_repeats_keep_counting(h: Harness, child: Stepper) -> None:
    """Cache hits are still decisions: counted, folded into the flow, reported as its repeats."""
    h.apply([rule("allow")])
    before = h.sensors.counters()
    assert [child("connect", PORT) for _ in range(5)] == ["ok"] * 5
    after = h.sensors.counters()
    assert after["allowed"] - before["allowed"] >= 5
    assert after["folded"] - before["folded"] >= 4
    assert len(h.conns(child.proc.pid, abi.EV_CONNECT)) == 1


# Inbound: a listener in the cgroup that accepts connections until its stdin closes.
ACCEPTOR = r"""
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(8)
print("ready", flush=True)
def serve():
    while True:
        c, _ = s.accept()
        c.close()
        print("accepted", flush=True)
threading.Thread(target=serve, daemon=True).start()
sys.stdin.read()
"""


@pytest.fixture
def acceptors(h: Harness) -> Iterator[list[subprocess.Popen[str]]]:
    """Acceptor processes started by a test (after it applied a policy that lets them listen), killed after."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.communicate(timeout=10)


def start_acceptor(h: Harness, procs: list[subprocess.Popen[str]], port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [PYTHON, "-c", ACCEPTOR, str(port)], preexec_fn=h.preexec(), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    procs.append(proc)
    assert read_line(proc.stdout, 10) == "ready"
    return proc


def connect_once(proc: subprocess.Popen[str], port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    assert read_line(proc.stdout, 10) == "accepted"


def inbound_rule(name: str, port: int, who: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    r: dict[str, Any] = {"name": name, "action": "allow", "direction": "ingress", "from": ["127.0.0.1"],
                         "ports": [port], "protocol": "tcp"}  # fmt: skip
    if who is not None:
        r["who"] = who
    return [{"name": "may-listen", "action": "allow", "direction": "listen", "protocol": "tcp"}, r]


def test_accept_reports_the_policy_in_force_across_a_swap(h: Harness, acceptors: list[subprocess.Popen[str]]) -> None:
    """Accepted connections carry the rule and generation of the policy that allowed them, before and after a swap."""
    port = free_port()
    first, gen_a = h.apply(inbound_rule("first", port))
    proc = start_acceptor(h, acceptors, port)
    connect_once(proc, port)
    connect_once(proc, port)  # same flow: folded
    second, gen_b = h.apply(inbound_rule("second", port))
    connect_once(proc, port)
    accepts = [(r.policy_gen, r.rule_id, r.verdict) for r in h.conns(proc.pid, abi.EV_ACCEPT)]
    assert accepts == [
        (gen_a, first.rule_id("first"), abi.VERDICT_ALLOW),
        (gen_b, second.rule_id("second"), abi.VERDICT_ALLOW),
    ]


def test_accept_under_a_cgroup_rule_keeps_the_syn_decision(
    h: Harness, acceptors: list[subprocess.Popen[str]]
) -> None:
    """sockops cannot see the socket's cgroup: the decision ingress took at SYN time is the one reported."""
    port = free_port()
    compiled, gen = h.apply(inbound_rule("by-cgroup", port, {"cgroup": [h.cgroup_rel]}))
    proc = start_acceptor(h, acceptors, port)
    connect_once(proc, port)
    (acc,) = h.conns(proc.pid, abi.EV_ACCEPT)
    assert (acc.policy_gen, acc.rule_id, acc.verdict, acc.task.tgid) == (
        gen, compiled.rule_id("by-cgroup"), abi.VERDICT_ALLOW, proc.pid,
    )  # fmt: skip


EXEC_CHILD = r"""
import os, socket, sys
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.connect(("127.0.0.1", port))
    print("ok", flush=True)
except OSError:
    print("refused", flush=True)
s.close()
os.execv(sys.argv[2], [sys.argv[2], "-c", f"exec 3<>/dev/udp/127.0.0.1/{port} && echo ok || echo refused"])
"""


def test_cached_walk_follows_an_exec_within_the_process(h: Harness) -> None:
    """An exe rule: the same process (same pid and start time) is allowed as python, refused once it execs bash."""
    bash = shutil.which("bash")
    assert bash is not None
    h.apply([rule("allow", {"exe": [REAL_PYTHON]})])
    out = subprocess.run(
        [PYTHON, "-c", EXEC_CHILD, str(PORT), bash], preexec_fn=h.preexec(), capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert out.stdout.split() == ["ok", "refused"], out.stderr


def test_folded_decisions_of_a_process_the_task_map_lacks_count_as_task_misses(
    h: Harness, child: Stepper
) -> None:
    """The task map is read only for events: folded decisions still count a miss each, from the flow's entry."""
    h.apply([rule("allow")])
    assert h.sensors.maps["tasks"].delete(U32.pack(child.proc.pid))
    before = h.sensors.counters()
    assert [child("connect", PORT) for _ in range(4)] == ["ok"] * 4
    after = h.sensors.counters()
    assert after["task_miss"] - before["task_miss"] == 4
    assert after["folded"] - before["folded"] == 3
    (r,) = h.conns(child.proc.pid, abi.EV_CONNECT)
    assert (r.task.exec_id, r.task.ppid, r.repeat) == (0, 0, 0)


@pytest.fixture
def short_window(h: Harness) -> Iterator[float]:
    """The flow window set to 300 ms for one test (seconds returned), then restored."""
    cfg = h.sensors.maps["config"]
    key = U32.pack(abi.CFG_FLOW_INTERVAL_MS)
    saved = cfg.lookup(key)
    assert saved is not None
    cfg.update(key, U32.pack(300))
    try:
        yield 0.3
    finally:
        cfg.update(key, saved)


def test_repeats_within_the_window_fold_and_the_next_event_reports_them(
    h: Harness, child: Stepper, short_window: float
) -> None:
    """The fold window (coarse clock): repeats inside it make no event; the first decision after it reports them."""
    h.apply([rule("allow")])
    assert [child("connect", PORT) for _ in range(3)] == ["ok"] * 3
    assert [r.repeat for r in h.conns(child.proc.pid, abi.EV_CONNECT)] == [0]
    time.sleep(short_window + 0.1)  # the behaviour under test is the passing of time
    assert child("connect", PORT) == "ok"
    assert [r.repeat for r in h.conns(child.proc.pid, abi.EV_CONNECT)] == [2]


def test_packet_sockets_fold_on_their_own_clock(h: Harness) -> None:
    """The packet-socket tracepoint cannot read the coarse clock: its flows still fold, on the boot clock."""
    if "tool_packet_socket" in h.sensors.missing:
        pytest.fail(f"packet socket sensor missing: {h.sensors.missing['tool_packet_socket']}")
    h.apply([{"name": "no-raw", "action": "deny", "direction": "raw"}])
    h.sensors.set_mode("detect")
    op = ("socket", socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    before = h.sensors.counters()
    result = h.run([op, op, op])
    assert (result.returncode, result.results) == (0, ["ok"] * 3)
    (r,) = h.conns(result.pid, abi.EV_SOCKET)
    assert r.flags & abi.F_PACKET and r.verdict == abi.VERDICT_WOULD_BLOCK
    assert h.sensors.counters()["folded"] - before["folded"] == 2
