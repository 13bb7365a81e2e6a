"""Benchmark: what the sensors add to a loopback TCP connect(), with 100k address rules loaded.

Usage (root): python benchmarks/bench_connect.py [--connects K] [--cycles C] [--rules R]
                                                 [--flow-intervals 1000,0]

Setup: one scratch cgroup per configuration:
  * ``off``: nothing attached;
  * ``on@<ms>``: the sensors loaded with ``Sensors.load(cgroup, mode="prevent",
    flow_interval_ms=<ms>)`` and a policy of R kernel rules applied: random IPv4 /32 and /24 deny
    rules (never inside 127.0.0.0/8) plus allow rules for 127.0.0.1 (egress, ingress, listen).
    With the default 1000 ms window, repeated connects to one destination fold into the flow's
    counter after the first event; with 0 every decision is a ring-buffer event.

One child process then runs C cycles. In each cycle it visits every cgroup in a rotating order:
it moves itself there (``cgroup.procs``; a socket belongs to the cgroup its creator was in when it
was made), and K times connects to a listener made in that cgroup, accepts, and closes both ends
(server side first, so no client port waits in TIME_WAIT). It times the connect() calls and the
whole iterations. Short interleaved blocks make the comparison robust on a busy machine: each
cycle gives one paired ratio per configuration, and the medians of those ratios are reported
(target: connect() under 3% slower with the sensors).

Then a second, shorter child runs with ``kernel.bpf_stats_enabled=1`` to read the programs' own
cost (``run_time_ns / run_cnt`` from ``bpftool prog show -j``) for tool_connect4 and the other
programs that ran; the sysctl is restored afterwards. That run is kept out of the comparison,
since the statistics themselves add a little to every program run.

Nobody consumes the ring buffers during the run: they are sized to hold every event, and the
ring_buffer_full counter is printed to show that no reservation failed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import structlog

from loaders import cgroup as cg
from loaders.sensors import Sensors, build_tables
from pipeline.policy.compiler import CompiledPolicy, KernelRule, WhoClass

REPO = Path(__file__).resolve().parents[1]
STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
EVENT_BYTES = 168  # a connection record (160) plus the ring buffer's 8-byte record header
EVENTS_PER_CONNECT = 2  # connect (egress) and accept (ingress, from sockops)

CHILD = r"""
import json, os, socket, sys, time
cgroups = sys.argv[1].split(",")
k, cycles, warmup = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
clock = time.perf_counter_ns

def enter(path):
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write("0\n")

listeners = {}
for path in cgroups:
    enter(path)
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen(1024)
    listeners[path] = lst

def block(path, count):
    enter(path)
    lst = listeners[path]
    addr = lst.getsockname()
    connect_ns = 0
    start = clock()
    for _ in range(count):
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t0 = clock()
        c.connect(addr)
        connect_ns += clock() - t0
        s, _ = lst.accept()
        s.close()
        c.close()
    return clock() - start, connect_ns

for path in cgroups:
    block(path, warmup)
out = {path: [] for path in cgroups}
n = len(cgroups)
for cycle in range(cycles):
    order = cgroups[cycle % n:] + cgroups[:cycle % n]
    for path in order:
        total, conn = block(path, k)
        out[path].append([total / k / 1000, conn / k / 1000])
enter(cgroups[0])
print(json.dumps(out))
"""


def v4_network(text: str) -> ipaddress.IPv6Network:
    """An IPv4 network as the compiler carries it: v4-mapped IPv6."""
    net = ipaddress.IPv4Network(text)
    return ipaddress.IPv6Network(f"::ffff:{net.network_address}/{96 + net.prefixlen}")


def make_policy(n_rules: int, seed: int = 1) -> CompiledPolicy:
    """A compiled policy built directly (parsing 100k rules of YAML would dominate the setup time).

    Args:
        n_rules: total kernel entries, including the three loopback allow rules.
        seed: random seed, so every run programs the same addresses.

    Returns:
        Allow rules for 127.0.0.1 (egress, ingress, listen; TCP, every port) and ``n_rules - 3``
        egress TCP deny rules on distinct random IPv4 /32 and /24 networks outside 127.0.0.0/8.
    """
    rng = random.Random(seed)
    loopback = v4_network("127.0.0.1/32")
    entries = [
        KernelRule(rule_id=i + 1, who_class=0, direction=d, protocol=6, network=loopback,
                   port_lo=0, port_hi=65535, action="allow")
        for i, d in enumerate(("egress", "ingress", "listen"))
    ]
    seen: set[ipaddress.IPv6Network] = set()
    while len(entries) < n_rules:
        a = rng.randrange(1 << 32)
        if a >> 24 == 127:
            continue
        if len(entries) % 2:
            net = v4_network(f"{ipaddress.IPv4Address(a & 0xFFFFFF00)}/24")
        else:
            net = v4_network(f"{ipaddress.IPv4Address(a)}/32")
        if net in seen:
            continue
        seen.add(net)
        entries.append(KernelRule(rule_id=len(entries) + 1, who_class=0, direction="egress", protocol=6,
                                  network=net, port_lo=0, port_hi=65535, action="deny"))
    directions = ("egress", "ingress", "listen", "raw")
    return CompiledPolicy(
        who_classes=[WhoClass(id=0)],
        entries=entries,
        defaults={"detect": {d: "alert" for d in directions}, "prevent": {d: "deny" for d in directions}},
        rules={},
        warnings=[],
        sources=["bench_connect"],
    )


def ringbuf_size(connects: int) -> int:
    """A power of two that holds every event of ``connects`` connections (at least 8 MiB)."""
    need = connects * EVENTS_PER_CONNECT * EVENT_BYTES
    size = 8 << 20
    while size < need:
        size <<= 1
    return size


def run_child(cgroups: list[str], k: int, cycles: int, warmup: int) -> dict[str, list[list[float]]]:
    """Run the interleaved connect blocks in one new process.

    Returns:
        Per cgroup, one [us per iteration, us per connect()] pair per cycle.
    """
    out = subprocess.run(
        [sys.executable, "-c", CHILD, ",".join(cgroups), str(k), str(cycles), str(warmup)],
        preexec_fn=cg.enter(cgroups[0]),
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=3600,
    )
    result: dict[str, list[list[float]]] = json.loads(out.stdout)
    return result


def prog_id(fd: int) -> int:
    """The kernel id of the program open as ``fd`` in this process."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("prog_id:"):
                return int(line.split()[1])
    raise RuntimeError(f"fd {fd} is not a BPF program")


def prog_stats(sensors: Sensors) -> dict[str, tuple[int, int]]:
    """run_time_ns and run_cnt of the sensors' attached programs, from ``bpftool prog show -j``."""
    ids = {prog_id(sensors.obj.program(name).fd): name for name in sensors.links}
    shown = json.loads(
        subprocess.run(["bpftool", "prog", "show", "-j"], check=True, capture_output=True, text=True).stdout
    )
    return {
        ids[p["id"]]: (int(p.get("run_time_ns", 0)), int(p.get("run_cnt", 0)))
        for p in shown
        if p["id"] in ids
    }


@contextmanager
def bpf_stats_enabled() -> Iterator[None]:
    """Turn ``kernel.bpf_stats_enabled`` on, and put the previous value back afterwards."""
    before = STATS_SYSCTL.read_text().strip()
    STATS_SYSCTL.write_text("1\n")
    try:
        yield
    finally:
        STATS_SYSCTL.write_text(before + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description="connect() cost with and without the sensors")
    ap.add_argument("--connects", type=int, default=2_000,
                    help="connects per block (one block per cgroup per cycle)")
    ap.add_argument("--cycles", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=1_000, help="untimed connects per cgroup before the cycles")
    ap.add_argument("--stats-cycles", type=int, default=5, help="cycles of the bpf_stats run")
    ap.add_argument("--rules", type=int, default=100_000)
    ap.add_argument("--flow-intervals", default="1000,0", help="flow_interval_ms values to measure")
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    intervals = [int(x) for x in args.flow_intervals.split(",")]

    t0 = time.perf_counter()
    policy = make_policy(args.rules)
    tables = build_tables(policy, cg.cgroup2_root())
    print(f"policy: {len(policy.entries)} kernel entries in {len(tables.nodes)} LPM nodes "
          f"(built in {time.perf_counter() - t0:.1f}s)")
    total_connects = (args.cycles + args.stats_cycles) * args.connects + 2 * args.warmup

    with ExitStack() as stack:
        off = stack.enter_context(cg.scratch_cgroup("toolbench-off"))
        labels = {off: "off"}
        sensors: dict[str, Sensors] = {}
        for ms in intervals:
            path = stack.enter_context(cg.scratch_cgroup(f"toolbench-on{ms}"))
            labels[path] = f"on@{ms}ms"
            t0 = time.perf_counter()
            s = stack.enter_context(
                Sensors.load(path, mode="prevent", flow_interval_ms=ms,
                             ringbuf_bytes=ringbuf_size(total_connects))
            )
            s.apply_policy(tables)
            sensors[path] = s
            print(f"{labels[path]}: sensors loaded and policy applied in {time.perf_counter() - t0:.1f}s; "
                  f"{len(s.links)} programs attached, missing: {sorted(s.missing) or 'none'}")
        paths = list(labels)

        t0 = time.perf_counter()
        result = run_child(paths, args.connects, args.cycles, args.warmup)
        print(f"{args.cycles} cycles x {len(paths)} cgroups x {args.connects} connects "
              f"in {time.perf_counter() - t0:.0f}s")
        with bpf_stats_enabled():
            run_child(paths[1:], args.connects, args.stats_cycles, 0)
            stats = {p: prog_stats(s) for p, s in sensors.items()}
        counters = {p: s.counters() for p, s in sensors.items()}

    base = result[off]
    base_iter = statistics.median(r[0] for r in base)
    base_conn = statistics.median(r[1] for r in base)
    print()
    print("medians over cycles; ratios are paired per cycle (same child, adjacent blocks)")
    print(f"{'':>10}  {'us/iter':>8}  {'us/connect':>10}  {'min us/connect':>14}  "
          f"{'iter vs off':>11}  {'connect vs off':>14}")
    print(f"{'off':>10}  {base_iter:8.2f}  {base_conn:10.2f}  {min(r[1] for r in base):14.2f}")
    for path in paths[1:]:
        rows = result[path]
        iter_ratio = statistics.median(r[0] / b[0] for r, b in zip(rows, base, strict=True))
        conn_ratio = statistics.median(r[1] / b[1] for r, b in zip(rows, base, strict=True))
        print(f"{labels[path]:>10}  {statistics.median(r[0] for r in rows):8.2f}  "
              f"{statistics.median(r[1] for r in rows):10.2f}  {min(r[1] for r in rows):14.2f}  "
              f"{100 * (iter_ratio - 1):+10.1f}%  {100 * (conn_ratio - 1):+13.1f}%")
    print("target: connect() under 3% slower with the sensors attached")
    print()
    print("kernel counters (whole run):")
    for path in paths[1:]:
        c = counters[path]
        print(f"  {labels[path]:>10}: events {c['events']}  folded {c['folded']}  "
              f"ring_buffer_full {c['ring_buffer_full']}  allowed {c['allowed']}  blocked {c['blocked']}")
    print()
    print("programs' own cost (kernel.bpf_stats_enabled=1, bpftool prog show -j run_time_ns/run_cnt):")
    stats_connects = args.stats_cycles * args.connects
    for path in paths[1:]:
        per_prog = stats[path]
        for name, (ns, cnt) in sorted(per_prog.items()):
            if not cnt:
                continue
            note = f"  = {100 * ns / cnt / 1000 / base_conn:.1f}% of an unhooked connect()" \
                if name == "tool_connect4" else ""
            print(f"  {labels[path]:>10} {name:<18} {ns / cnt:7.0f} ns/run  "
                  f"{cnt / stats_connects:5.2f} runs/connect{note}")
        per_iter = sum(ns for ns, _ in per_prog.values()) / stats_connects / 1000
        print(f"  {labels[path]:>10} all programs: {per_iter:.2f} us per iteration "
              f"= {100 * per_iter / base_iter:.1f}% of an unhooked iteration")


if __name__ == "__main__":
    main()
