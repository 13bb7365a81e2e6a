"""Benchmark: what the sensors add to a loopback TCP connect(), with 100k address rules loaded.

Usage (root): python benchmarks/bench_connect.py [--connects K] [--cycles C] [--rules R]
                                                 [--flow-intervals 1000,0] [--cpu N] [--client-only]
                                                 [--object PATH] [--compare-object PATH]

Setup: one scratch cgroup per configuration:
  * ``off``: nothing attached;
  * ``on@<ms>``: the sensors loaded with ``Sensors.load(cgroup, mode="prevent",
    flow_interval_ms=<ms>)`` and a policy of R kernel rules applied: random IPv4 /32 and /24 deny
    rules (never inside 127.0.0.0/8) plus allow rules for 127.0.0.1 (egress, ingress, listen).
    With the default 1000 ms window, repeated connects to one destination fold into the flow's
    counter after the first event; with 0 every decision is a ring-buffer event.
  * ``hooks``: do-nothing programs (``return 1``, loaded with the raw bpf(2) syscall) on every
    cgroup hook the sensors attach. This is the floor: what the kernel charges for running a
    program at these hooks at all. The report compares each ``on`` configuration with it too,
    which separates the sensors' own work from the hooks' cost. (The sensors' tracepoints are
    host-wide, so they run in every configuration, ``off`` and ``hooks`` included: in
    ``socket()`` and process start and exit, outside the timed ``connect()``.)
  * ``cmp@<ms>`` with ``--compare-object``: the same as ``on@<ms>`` with another build of
    sensors.bpf.o, compared with ``--object``'s in the same run (a before/after without two runs).

One child process, pinned to one CPU (``--cpu``; default the highest one, -1: not pinned), runs C cycles.
In each cycle it visits every configuration in a rotating order: it moves itself into the
configuration's cgroup (``cgroup.procs``; a socket belongs to the cgroup its creator was in when
it was made), and K times connects to a listener made in that cgroup, accepts, and closes both
ends (server side first, so no client port waits in TIME_WAIT). Both ends are thus in the
measured cgroup: one connect() pays for connect4 and for the client's and the server's ingress
and sockops programs. It times every connect() call and the whole iterations. Short interleaved
blocks make the comparison robust on a busy machine: each cycle gives one paired ratio per
configuration; the medians of those ratios are reported, with their interquartile range, for
the mean connect() time of a block (the target: under 3% slower with the sensors) and for its
median connect() time (less sensitive to interrupts and preemption).

``--client-only`` adds, for each ``on`` configuration, one clearly labelled ``/client``
configuration whose listener is made in the ``off`` cgroup: only the client side is hooked.
``--object`` loads another build of sensors.bpf.o (for instance an older commit's, from
``git show REV:loaders/objects/sensors.bpf.o``) to compare before and after with this benchmark.

Then, with ``kernel.bpf_stats_enabled=1``, the programs' own time is read for every hooked
configuration (``on``, ``cmp``, ``hooks``, and their ``/client`` ones; a ``hooks`` row names
the do-nothing program by the sensor whose hook it sits on): ``--stats-cycles`` short children, one block each, with
``run_time_ns`` and ``run_cnt`` (``bpftool prog show -j``) read before and after every block. For
each block this gives the programs' time per connection; the median and range over the blocks are
printed as a share of the ``off`` connect() time (the connect-path programs: connect4, ingress,
sockops) and of the ``off`` iteration (every program). That share is the stable figure on a shared
machine, printed next to the paired wall-clock ratio, not instead of it: it counts only the
programs' own time (not the kernel's work around each run, nor what they do to the caches for the
rest of connect()), some ingress runs happen in close(), and each run includes the statistics' own
two clock reads (about 80 ns here). These blocks are kept out of the wall-clock comparison; the
sysctl is restored afterwards.

Nobody consumes the ring buffers during the run: they are sized to hold every event, and the
ring_buffer_full counter is printed to show that no reservation failed.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import itertools
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from struct import pack as struct_pack

import structlog

from loaders import cgroup as cg
from loaders.sensors import OBJECT_PATH, Sensors, build_tables
from pipeline.policy.compiler import CompiledPolicy, KernelRule, WhoClass

REPO = Path(__file__).resolve().parents[1]
STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
EVENT_BYTES = 168  # a connection record (160) plus the ring buffer's 8-byte record header
EVENTS_PER_CONNECT = 2  # connect (egress) and accept (ingress, from sockops)
CONNECT_PATH = ("tool_connect4", "tool_ingress", "tool_sockops")  # the programs a loopback connect() runs

# Do-nothing programs for the ``hooks`` configuration: (program type, attach type) from
# include/uapi/linux/bpf.h for every cgroup program the sensors attach, in the sensors' names.
NOOP_HOOKS = {
    "tool_connect4": (18, 10),  # BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT
    "tool_connect6": (18, 11),  # ... BPF_CGROUP_INET6_CONNECT
    "tool_sendmsg4": (18, 14),  # ... BPF_CGROUP_UDP4_SENDMSG
    "tool_sendmsg6": (18, 15),  # ... BPF_CGROUP_UDP6_SENDMSG
    "tool_bind4": (18, 8),  # ... BPF_CGROUP_INET4_BIND
    "tool_bind6": (18, 9),  # ... BPF_CGROUP_INET6_BIND
    "tool_post_bind4": (9, 12),  # BPF_PROG_TYPE_CGROUP_SOCK, BPF_CGROUP_INET4_POST_BIND
    "tool_post_bind6": (9, 13),  # ... BPF_CGROUP_INET6_POST_BIND
    "tool_sock_create": (9, 2),  # ... BPF_CGROUP_INET_SOCK_CREATE
    "tool_ingress": (8, 0),  # BPF_PROG_TYPE_CGROUP_SKB, BPF_CGROUP_INET_INGRESS
    "tool_sockops": (13, 3),  # BPF_PROG_TYPE_SOCK_OPS, BPF_CGROUP_SOCK_OPS
}
NOOP_INSNS = bytes.fromhex("b7000000010000009500000000000000")  # r0 = 1 (allow, pass); exit
BPF_PROG_LOAD, BPF_LINK_CREATE = 5, 28
SYS_BPF = {"x86_64": 321, "aarch64": 280}

CHILD = r"""
import json, os, socket, sys, time
from array import array
configs = json.loads(sys.argv[1])  # [[client cgroup, listener cgroup], ...]
k, cycles, warmup, cpu = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})
clock = time.perf_counter_ns

def enter(path):
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write("0\n")

listeners = []
for client, listen in configs:
    enter(listen)
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen(1024)
    listeners.append(lst)

def block(i, count):
    enter(configs[i][0])
    lst = listeners[i]
    addr = lst.getsockname()
    times = array("q", bytes(8 * count))
    start = clock()
    for j in range(count):
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t0 = clock()
        c.connect(addr)
        times[j] = clock() - t0
        s, _ = lst.accept()
        s.close()
        c.close()
    total = clock() - start
    return [total / count / 1000, sum(times) / count / 1000, sorted(times)[count // 2] / 1000]

n = len(configs)
for i in range(n):
    if warmup:
        block(i, warmup)
out = [[] for _ in range(n)]
for cycle in range(cycles):
    for i in [(cycle + j) % n for j in range(n)]:
        out[i].append(block(i, k))
enter(configs[0][0])
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
        KernelRule(
            rule_id=i + 1,
            who_class=0,
            direction=d,
            protocol=6,
            network=loopback,
            port_lo=0,
            port_hi=65535,
            action="allow",
        )
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
        entries.append(
            KernelRule(
                rule_id=len(entries) + 1,
                who_class=0,
                direction="egress",
                protocol=6,
                network=net,
                port_lo=0,
                port_hi=65535,
                action="deny",
            )
        )
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


def run_child(configs: list[tuple[str, str]], k: int, cycles: int, warmup: int, cpu: int) -> list[list[list[float]]]:
    """Run the interleaved connect blocks in one new process.

    Args:
        configs: (client cgroup, listener cgroup) of each configuration.
        k: connects per block.
        cycles: blocks per configuration.
        warmup: untimed connects per configuration first.
        cpu: the CPU the child is pinned to (-1: not pinned).

    Returns:
        Per configuration, one [us per iteration, mean us per connect(), median us per connect()]
        triple per cycle.
    """
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(configs), str(k), str(cycles), str(warmup), str(cpu)],
        preexec_fn=cg.enter(configs[0][0]),
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=3600,
    )
    result: list[list[list[float]]] = json.loads(out.stdout)
    return result


def paired(rows: list[list[float]], base: list[list[float]], field: int) -> tuple[float, float, float]:
    """Median and interquartile range of the per-cycle ratios ``rows[i][field] / base[i][field]``, minus 1."""
    ratios = [r[field] / b[field] - 1 for r, b in zip(rows, base, strict=True)]
    q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return med, q1, q3


class NoopHooks:
    """Programs that only return "allow", attached to a cgroup on the same hooks as the sensors.

    They measure what the kernel charges for running a cgroup program at each hook at all, with
    no work in it: the floor under any sensor on these hooks. Loaded with the raw ``bpf(2)``
    syscall, two instructions each, so that nothing of the product's loader is in the figure.
    """

    def __init__(self, cgroup_path: str, names: list[str]) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fds: list[int] = []
        self.prog_fds: dict[str, int] = {}
        cgroup_fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in names:
                prog_type, attach_type = NOOP_HOOKS[name]
                prog = self._load(name, prog_type, attach_type)
                self.prog_fds[name] = prog
                self._fds.append(self._bpf(BPF_LINK_CREATE, struct_pack("IIII", prog, cgroup_fd, attach_type, 0)))
        except BaseException:
            self.close()
            raise
        finally:
            os.close(cgroup_fd)

    def _bpf(self, cmd: int, attr: bytes) -> int:
        machine = os.uname().machine
        if machine not in SYS_BPF:
            raise SystemExit(f"the do-nothing hooks need bpf(2)'s syscall number on {machine}: add it to SYS_BPF")
        buf = ctypes.create_string_buffer(attr.ljust(128, b"\0"), 128)
        fd = self._libc.syscall(SYS_BPF[machine], cmd, buf, 128)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"bpf({cmd}) for the do-nothing hooks: {os.strerror(err)}")
        return int(fd)

    def _load(self, name: str, prog_type: int, attach_type: int) -> int:
        insns = ctypes.create_string_buffer(NOOP_INSNS, len(NOOP_INSNS))
        license = ctypes.create_string_buffer(b"GPL")
        attr = struct_pack(
            "IIQQIIQII16sII", prog_type, len(NOOP_INSNS) // 8, ctypes.addressof(insns),
            ctypes.addressof(license), 0, 0, 0, 0, 0, name.replace("tool_", "noop_")[:15].encode(), 0, attach_type,
        )  # fmt: skip
        fd = self._bpf(BPF_PROG_LOAD, attr)
        self._fds.append(fd)
        return fd

    def close(self) -> None:
        """Detach (the links close) and unload."""
        for fd in reversed(self._fds):
            os.close(fd)
        self._fds.clear()


def prog_id(fd: int) -> int:
    """The kernel id of the program open as ``fd`` in this process."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("prog_id:"):
                return int(line.split()[1])
    raise RuntimeError(f"fd {fd} is not a BPF program")


def prog_stats(programs: dict[str, int]) -> dict[str, tuple[int, int]]:
    """run_time_ns and run_cnt of the programs (name -> fd open here), from ``bpftool prog show -j``."""
    ids = {prog_id(fd): name for name, fd in programs.items()}
    shown = json.loads(
        subprocess.run(["bpftool", "prog", "show", "-j"], check=True, capture_output=True, text=True).stdout
    )
    return {ids[p["id"]]: (int(p.get("run_time_ns", 0)), int(p.get("run_cnt", 0))) for p in shown if p["id"] in ids}


def attached_programs(sensors: Sensors) -> dict[str, int]:
    """The sensors' attached programs: name -> fd."""
    return {name: sensors.obj.program(name).fd for name in sensors.links}


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
    ap.add_argument("--connects", type=int, default=2_000, help="connects per block (one block per cgroup per cycle)")
    ap.add_argument("--cycles", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=1_000, help="untimed connects per cgroup before the cycles")
    ap.add_argument("--stats-cycles", type=int, default=10, help="blocks per configuration of the bpf_stats run")
    ap.add_argument("--rules", type=int, default=100_000)
    ap.add_argument("--flow-intervals", default="1000,0", help="flow_interval_ms values to measure")
    ap.add_argument(
        "--cpu",
        type=int,
        default=max(os.sched_getaffinity(0)),
        help="CPU to pin the child to (default: the highest this process may use; -1: not pinned)",
    )
    ap.add_argument("--object", type=Path, default=OBJECT_PATH, help="the sensors object to load")
    ap.add_argument(
        "--compare-object",
        type=Path,
        default=None,
        help="also load this build of sensors.bpf.o (cmp@<ms> configurations) and compare it with --object",
    )
    ap.add_argument(
        "--client-only",
        action="store_true",
        help="also measure each 'on' configuration with the listener outside the cgroup",
    )
    args = ap.parse_args()
    for option, path in (("--object", args.object), ("--compare-object", args.compare_object)):
        if path is not None and not path.is_file():
            ap.error(f"{option} {path}: no such file (a sensors.bpf.o build)")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    intervals = [int(x) for x in args.flow_intervals.split(",")]

    t0 = time.perf_counter()
    policy = make_policy(args.rules)
    tables = build_tables(policy, cg.cgroup2_root())
    print(
        f"policy: {len(policy.entries)} kernel entries in {len(tables.nodes)} LPM nodes "
        f"(built in {time.perf_counter() - t0:.1f}s)"
    )
    total_connects = (args.cycles + args.stats_cycles) * (
        2 if args.client_only else 1
    ) * args.connects + 3 * args.warmup

    with ExitStack() as stack:
        off = stack.enter_context(cg.scratch_cgroup("toolbench-off"))
        labels = {off: "off"}
        sensors: dict[str, Sensors] = {}
        programs: dict[str, dict[str, int]] = {}  # cgroup -> its attached programs, name -> fd
        objects = [("on", args.object)] + ([("cmp", args.compare_object)] if args.compare_object else [])
        for (prefix, object_path), ms in itertools.product(objects, intervals):
            path = stack.enter_context(cg.scratch_cgroup(f"toolbench-{prefix}{ms}"))
            labels[path] = f"{prefix}@{ms}ms"
            t0 = time.perf_counter()
            s = stack.enter_context(
                Sensors.load(
                    path,
                    object_path=object_path,
                    mode="prevent",
                    flow_interval_ms=ms,
                    ringbuf_bytes=ringbuf_size(total_connects),
                )
            )
            s.apply_policy(tables)
            sensors[path] = s
            programs[path] = attached_programs(s)
            print(
                f"{labels[path]}: {object_path} loaded and policy applied in {time.perf_counter() - t0:.1f}s; "
                f"{len(s.links)} programs attached, missing: {sorted(s.missing) or 'none'}"
            )
        hooks = stack.enter_context(cg.scratch_cgroup("toolbench-hooks"))
        labels[hooks] = "hooks"
        noop = NoopHooks(hooks, [name for name in programs[next(iter(sensors))] if name in NOOP_HOOKS])
        stack.callback(noop.close)
        programs[hooks] = noop.prog_fds
        print(f"hooks: {len(noop.prog_fds)} do-nothing programs attached on the sensors' cgroup hooks")
        paths = list(labels)
        configs = [(p, p) for p in paths]
        names = [labels[p] for p in paths]
        if args.client_only:
            configs += [(p, off) for p in paths[1:]]
            names += [f"{labels[p]}/client" for p in paths[1:]]

        t0 = time.perf_counter()
        result = run_child(configs, args.connects, args.cycles, args.warmup, args.cpu)
        print(
            f"{args.cycles} cycles x {len(configs)} configurations x {args.connects} connects "
            f"in {time.perf_counter() - t0:.0f}s (child pinned to CPU {args.cpu})"
        )
        own = measure_own_cost(configs[1:], [programs[c] for c, _ in configs[1:]], args)
        counters = {p: s.counters() for p, s in sensors.items()}

    base = result[0]
    base_iter = statistics.median(r[0] for r in base)
    base_conn = statistics.median(r[1] for r in base)
    print()
    print(
        "medians over cycles; ratios are paired per cycle (same child, adjacent blocks), "
        "[interquartile range]; '/client': listener outside the cgroup (client side hooked only)"
    )
    print(
        f"{'':>17}  {'us/iter':>7}  {'us/connect':>10}  {'iter vs off':>11}  "
        f"{'connect (mean) vs off':>27}  {'connect (median) vs off':>27}"
    )
    print(f"{'off':>17}  {base_iter:7.2f}  {base_conn:10.2f}")
    for name, rows in zip(names[1:], result[1:], strict=True):
        it, conn, med = paired(rows, base, 0), paired(rows, base, 1), paired(rows, base, 2)
        print(
            f"{name:>17}  {statistics.median(r[0] for r in rows):7.2f}  "
            f"{statistics.median(r[1] for r in rows):10.2f}  {100 * it[0]:+10.1f}%  "
            f"{100 * conn[0]:+8.1f}% [{100 * conn[1]:+5.1f}, {100 * conn[2]:+5.1f}]  "
            f"{100 * med[0]:+8.1f}% [{100 * med[1]:+5.1f}, {100 * med[2]:+5.1f}]"
        )
    print("target: connect() (mean) under 3% slower with the sensors attached")
    print()
    print(
        "the sensors against the do-nothing hooks (what the programs' work adds to the hooks' own cost), "
        "paired per cycle:"
    )
    by_name = dict(zip(names, result, strict=True))
    pairs = [(n, "hooks/client" if n.endswith("/client") else "hooks") for n in names[1:] if not n.startswith("hooks")]
    print_pairs(pairs, by_name)
    if args.compare_object:
        print(f"this object ({args.object}) against the other one ({args.compare_object}), paired per cycle:")
        print_pairs([(n, "cmp" + n[2:]) for n in names if n.startswith("on@")], by_name)
    print()
    print("kernel counters (whole run):")
    for path in sensors:
        c = counters[path]
        print(
            f"  {labels[path]:>10}: events {c['events']}  folded {c['folded']}  "
            f"ring_buffer_full {c['ring_buffer_full']}  allowed {c['allowed']}  blocked {c['blocked']}"
        )
    print()
    print(
        "programs' own time per connection (kernel.bpf_stats_enabled=1, run_time_ns/run_cnt from bpftool; "
        f"{args.stats_cycles} blocks of {args.connects} connects per configuration, median [min, max] over blocks):"
    )
    for name, per_cycle in zip(names[1:], own, strict=True):
        for label, progs, ref, what in (
            ("connect path", CONNECT_PATH, base_conn, "an unhooked connect()"),
            ("all programs", None, base_iter, "an unhooked iteration"),
        ):
            totals = [
                sum(ns for prog, (ns, _) in cycle.items() if progs is None or prog in progs) / args.connects
                for cycle in per_cycle
            ]
            runs = (
                statistics.median(
                    sum(cnt for prog, (_, cnt) in cycle.items() if progs is None or prog in progs)
                    for cycle in per_cycle
                )
                / args.connects
            )
            lo, med, hi = (x / 1000 for x in (min(totals), statistics.median(totals), max(totals)))
            print(
                f"  {name if label == 'connect path' else '':>17}  {label}: {med:5.2f} us [{lo:.2f}, {hi:.2f}] "
                f"in {runs:4.1f} runs = {100 * med / ref:4.1f}% [{100 * lo / ref:.1f}, {100 * hi / ref:.1f}] "
                f"of {what}"
            )
        for prog in sorted({prog for cycle in per_cycle for prog in cycle}):
            ns_run = [c[prog][0] / c[prog][1] for c in per_cycle if c.get(prog, (0, 0))[1]]
            cnt = statistics.median(c.get(prog, (0, 0))[1] for c in per_cycle) / args.connects
            if ns_run and cnt >= 0.01:
                print(
                    f"  {'':>17}    {prog:<18} {statistics.median(ns_run):6.0f} ns/run "
                    f"[{min(ns_run):.0f}, {max(ns_run):.0f}]  {cnt:5.2f} runs/connect"
                )
    print("  connect path: tool_connect4, tool_ingress, tool_sockops, whose runs are in connect() and, for some")
    print("  ingress runs, in close(); all programs adds socket() (sock_create, packet_socket) and the child's")
    print("  exec/fork/exit. Each run includes the statistics' own two clock reads (about 80 ns here).")


def print_pairs(pairs: list[tuple[str, str]], by_name: dict[str, list[list[float]]]) -> None:
    """Print the paired per-cycle ratios of each (configuration, reference) pair."""
    for name, ref in pairs:
        conn, med = paired(by_name[name], by_name[ref], 1), paired(by_name[name], by_name[ref], 2)
        print(
            f"{name + ' vs ' + ref:>34}  connect (mean) {100 * conn[0]:+6.1f}% [{100 * conn[1]:+5.1f}, "
            f"{100 * conn[2]:+5.1f}]  connect (median) {100 * med[0]:+6.1f}% [{100 * med[1]:+5.1f}, "
            f"{100 * med[2]:+5.1f}]"
        )


def measure_own_cost(
    configs: list[tuple[str, str]], programs: list[dict[str, int]], args: argparse.Namespace
) -> list[list[dict[str, tuple[int, int]]]]:
    """The programs' own time in short blocks with ``kernel.bpf_stats_enabled=1``.

    Args:
        configs: (client cgroup, listener cgroup) of each hooked configuration.
        programs: the programs attached for each configuration (its client cgroup's), name -> fd.
        args: the benchmark's options (connects, stats_cycles, cpu).

    Returns:
        Per configuration, per cycle: program name -> (run_time_ns, run_cnt) of that block alone.
    """
    out: list[list[dict[str, tuple[int, int]]]] = [[] for _ in configs]
    with bpf_stats_enabled():
        for _ in range(args.stats_cycles):
            for i, (config, progs) in enumerate(zip(configs, programs, strict=True)):
                before = prog_stats(progs)
                run_child([config], args.connects, 1, 0, args.cpu)
                after = prog_stats(progs)
                out[i].append({
                    name: (ns - before.get(name, (0, 0))[0], cnt - before.get(name, (0, 0))[1])
                    for name, (ns, cnt) in after.items()
                    if cnt - before.get(name, (0, 0))[1]
                })  # fmt: skip
    return out


if __name__ == "__main__":
    main()
