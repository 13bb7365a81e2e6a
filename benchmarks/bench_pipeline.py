"""Benchmark: the whole pipeline, kernel to an independent NATS subscriber, and the agent's CPU and memory.

Usage (root): python benchmarks/bench_pipeline.py [--storm N] [--procs P] [--rates 1000,20000] [--seconds S]

1. Throughput under a connection storm: P processes in a scratch cgroup send N UDP datagrams each
   to distinct ports (flow folding off, so every datagram is a decision and an event). A separate
   subscriber process counts what arrives on NATS. Prints events/s end to end and checks that
   received + ring_buffer_full (the kernel's count of what it could not queue) == produced: zero
   unaccounted loss. Baseline in the same run: the rate at which the kernel produced them.
2. CPU and RSS of the agent at fixed event rates (paced senders), against the same agent idle
   over the same window (baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loaders import cgroup as cg

REPO = Path(__file__).resolve().parents[1]
CLK = os.sysconf("SC_CLK_TCK")

SUBSCRIBER = r"""
import asyncio, json, sys, time
FILTER = True
import nats
async def main():
    url, expect, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    global FILTER
    FILTER = sys.argv[4] == "storm"
    nc = await nats.connect(url, pending_size=1024*1024*1024)
    n = 0; first = last = None
    procs = {}
    done = asyncio.Event()
    async def cb(msg):
        nonlocal n, first, last
        now = time.monotonic()
        if FILTER and not 20000 <= json.loads(msg.data)["remote"]["port"] < 40000:
            return  # not from the storm
        if first is None: first = now
        last = now
        n += 1
        if n >= expect: done.set()
    async def on_process(msg):
        pid = str(json.loads(msg.data)["process"]["pid"])
        procs[pid] = procs.get(pid, 0) + 1
    await nc.subscribe("tool.events.*.connection.>", cb=cb, pending_msgs_limit=10_000_000, pending_bytes_limit=-1)
    await nc.subscribe("tool.events.*.process.>", cb=on_process, pending_msgs_limit=1_000_000, pending_bytes_limit=-1)
    await nc.flush(); await nc.flush()
    print("ready", flush=True)
    deadline = time.monotonic() + timeout
    while not done.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        if last is not None and time.monotonic() - last > 3.0:
            break  # quiet for 3 s: what was lost is not coming
    await asyncio.sleep(1.0)  # the senders' exit events follow their last datagram
    print(json.dumps({"received": n, "seconds": (last - first) if first else 0.0, "procs": procs}), flush=True)
    await nc.close()
asyncio.run(main())
"""

SENDER = r"""
import socket, sys, time
n, rate, base = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
start = time.monotonic()
batch = 100
for i in range(0, n, batch):
    for j in range(i, min(n, i + batch)):
        s.sendto(b"x", ("127.0.0.1", base + j % 15000))
    if rate:
        ahead = (i + batch) / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
"""


PRODUCER = r"""
import os, sys, time
calls = int(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    rounds = int(line)
    for _ in range(rounds):
        os.getppid()
    print("done", flush=True)
"""


def agent_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def agent_rss_mb(pid: int) -> tuple[float, float]:
    rss = hwm = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return rss, hwm


def agent_stats(state: Path) -> dict[str, Any]:
    """The running agent's counters (tool-pipeline stats): kernel, pipeline and publisher."""
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "stats", "--state-dir", str(state)],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def kernel_counters(state: Path) -> dict[str, int]:
    return agent_stats(state)["kernel"]  # type: ignore[no-any-return]


def consumer_url(state: Path) -> str:
    c = json.loads((state / "credentials" / "consumer.json").read_text())
    return str(c["url"]).replace("nats://", f"nats://{c['user']}:{c['password']}@")


def start_agent(tmp: Path, cgroup_path: str, producer_pid: int, burst: int) -> tuple[subprocess.Popen[bytes], Path]:
    state = tmp / "state"
    cfg = tmp / "config.yaml"
    cfg.write_text(  # default 8 MiB ring buffer
        "flow_interval_ms: 0\naudit_log: ''\nloss_report_interval_s: 60\n"
        f"bench_producer_tgid: {producer_pid}\nbench_producer_burst: {burst}\n"
    )
    err = (tmp / "agent.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "--config", str(cfg), "--cgroup", cgroup_path,
         "--state-dir", str(state), "--nats-port", "0"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while b"agent_running" not in (tmp / "agent.log").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"agent did not start:\n{(tmp / 'agent.log').read_text()[-3000:]}")
        time.sleep(0.1)
    return proc, state


def pipeline_stats(state: Path) -> dict[str, int]:
    return agent_stats(state)["publisher"]  # type: ignore[no-any-return]


def wait_idle(state: Path) -> None:
    """Wait until the agent has published everything of the previous phase."""
    last = -1
    while True:
        confirmed = pipeline_stats(state)["confirmed"]
        if confirmed == last:
            return
        last = confirmed
        time.sleep(1.0)


def start_subscriber(state: Path, expect: int, which: str) -> subprocess.Popen[str]:
    """An independent subscriber process, returned once its subscription is in place.

    Args:
        which: "storm" counts only the storm's destination ports; "all" counts every connection event.
    """
    sub = subprocess.Popen(
        [sys.executable, "-c", SUBSCRIBER, consumer_url(state), str(expect), "120", which],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert sub.stdout is not None and sub.stdout.readline().strip() == "ready"
    return sub


def storm(state: Path, cgroup_path: str, procs: int, per_proc: int) -> dict[str, float]:
    total = procs * per_proc
    wait_idle(state)
    before = kernel_counters(state)
    sub = start_subscriber(state, total, "storm")
    assert sub.stdout is not None
    t0 = time.monotonic()
    senders = [
        subprocess.Popen([sys.executable, "-c", SENDER, str(per_proc), "0", str(20000 + i * 500)],
                         preexec_fn=cg.enter(cgroup_path))
        for i in range(procs)
    ]  # fmt: skip
    for s in senders:
        s.wait()
    produced_s = time.monotonic() - t0
    result = json.loads(sub.stdout.readline())
    sub.wait()
    after = kernel_counters(state)
    lost = after["ring_buffer_full"] - before["ring_buffer_full"]
    # The ring buffer also carries each sender's exec and exit records; a lost one counts in
    # ring_buffer_full too, so account for them: records = datagrams + 2 per sender.
    proc_records = sum(result["procs"].get(str(p.pid), 0) for p in senders)
    decisions = (after["allowed"] + after["blocked"] + after["would_block"]) - (
        before["allowed"] + before["blocked"] + before["would_block"]
    )
    return {
        "produced": total,
        "kernel_decisions": decisions,
        "received": result["received"],
        "ring_buffer_full": lost,
        "unaccounted": total + 2 * procs - result["received"] - proc_records - lost,
        "kernel_rate": total / produced_s,
        "pipeline_rate": result["received"] / result["seconds"] if result["seconds"] else 0.0,
    }


def synthetic(state: Path, producer: subprocess.Popen[str], calls: int, burst: int, agent_pid: int) -> dict[str, float]:
    """Drive the pipeline from the kernel-side producer: calls x burst records as fast as the kernel emits."""
    total = calls * burst
    wait_idle(state)
    before = kernel_counters(state)
    sub = start_subscriber(state, total, "all")
    assert sub.stdout is not None and producer.stdin is not None and producer.stdout is not None
    t0 = time.monotonic()
    cpu0 = agent_cpu_seconds(agent_pid)
    producer.stdin.write(f"{calls}\n")
    producer.stdin.flush()
    assert producer.stdout.readline().strip() == "done"
    produced_s = time.monotonic() - t0
    result = json.loads(sub.stdout.readline())
    sub.wait()
    busy = agent_cpu_seconds(agent_pid) - cpu0
    after = kernel_counters(state)
    lost = after["ring_buffer_full"] - before["ring_buffer_full"]
    return {
        "agent_cpu_percent": 100 * busy / max(result["seconds"], 1e-9),
        "produced": total,
        "received": result["received"],
        "ring_buffer_full": lost,
        "unaccounted": total - result["received"] - lost,
        "kernel_rate": total / produced_s,
        "pipeline_rate": result["received"] / result["seconds"] if result["seconds"] else 0.0,
    }


def steady(pid: int, cgroup_path: str, rate: int, seconds: float) -> dict[str, float]:
    n = int(rate * seconds)
    c0, t0 = agent_cpu_seconds(pid), time.monotonic()
    sender = subprocess.Popen([sys.executable, "-c", SENDER, str(n), str(rate), "40000"],
                              preexec_fn=cg.enter(cgroup_path))  # fmt: skip
    sender.wait()
    time.sleep(1.0)  # let the pipeline finish the tail
    c1, t1 = agent_cpu_seconds(pid), time.monotonic()
    rss, hwm = agent_rss_mb(pid)
    return {"rate": rate, "cpu_percent": 100 * (c1 - c0) / (t1 - t0), "rss_mb": rss, "peak_rss_mb": hwm}


def idle(pid: int, seconds: float) -> dict[str, float]:
    c0, t0 = agent_cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    c1, t1 = agent_cpu_seconds(pid), time.monotonic()
    rss, hwm = agent_rss_mb(pid)
    return {"rate": 0, "cpu_percent": 100 * (c1 - c0) / (t1 - t0), "rss_mb": rss, "peak_rss_mb": hwm}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storm", type=int, default=50000, help="datagrams per storm process")
    ap.add_argument("--procs", type=int, default=4, help="storm processes")
    ap.add_argument("--rates", default="1000,20000", help="steady event rates for CPU/RSS")
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of each steady rate")
    ap.add_argument("--synthetic", type=int, default=1000, help="getppid() calls of the kernel producer")
    ap.add_argument("--burst", type=int, default=256, help="records the kernel producer emits per call")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark attaches the sensors to a scratch cgroup")

    with tempfile.TemporaryDirectory() as tmpdir, cg.scratch_cgroup("toolbench") as cgroup_path:
        tmp = Path(tmpdir)
        producer = subprocess.Popen([sys.executable, "-c", PRODUCER, "0"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert producer.stdout is not None and producer.stdout.readline().strip() == "ready"
        proc, state = start_agent(tmp, cgroup_path, producer.pid, args.burst)
        try:
            print("## CPU and RSS of the agent (2-core machine; one core = 100%)")
            base = idle(proc.pid, args.seconds)
            print(f"idle (baseline)     cpu {base['cpu_percent']:5.1f}%  rss {base['rss_mb']:6.1f} MB")
            for rate in (int(r) for r in args.rates.split(",")):
                r = steady(proc.pid, cgroup_path, rate, args.seconds)
                print(
                    f"{rate:>7} events/s    cpu {r['cpu_percent']:5.1f}%  rss {r['rss_mb']:6.1f} MB  "
                    f"(peak {r['peak_rss_mb']:.1f} MB)"
                )
            print()
            print(f"## Connection storm: {args.procs} processes x {args.storm} UDP datagrams, flow folding off")
            s = storm(state, cgroup_path, args.procs, args.storm)
            print(f"kernel produced     {s['produced']:>9} decisions at {s['kernel_rate']:>9.0f}/s (baseline)")
            print(f"subscriber received {s['received']:>9} events    at {s['pipeline_rate']:>9.0f}/s end to end")
            print(f"ring buffer full    {s['ring_buffer_full']:>9} (counted by the kernel, reported as loss)")
            print(f"unaccounted         {s['unaccounted']:>9}")
            print(f"pipeline/kernel     {s['pipeline_rate'] / s['kernel_rate']:.2f}")
            print()
            print(f"## Kernel-side synthetic producer: {args.synthetic} x {args.burst} records")
            y = synthetic(state, producer, args.synthetic, args.burst, proc.pid)
            print(f"kernel produced     {y['produced']:>9} records   at {y['kernel_rate']:>9.0f}/s (baseline)")
            print(f"subscriber received {y['received']:>9} events    at {y['pipeline_rate']:>9.0f}/s end to end")
            print(f"ring buffer full    {y['ring_buffer_full']:>9} (counted by the kernel, reported as loss)")
            print(f"unaccounted         {y['unaccounted']:>9}")
            print(f"agent cpu           {y['agent_cpu_percent']:>8.0f}% of one core while draining")
            return 0 if s["unaccounted"] == 0 and y["unaccounted"] == 0 else 1
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            producer.kill()


if __name__ == "__main__":
    raise SystemExit(main())
