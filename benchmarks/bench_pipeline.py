"""Benchmark: the whole pipeline, kernel to an independent NATS subscriber, and the agent's CPU and memory.

Usage (root): python benchmarks/bench_pipeline.py [--storm N] [--procs P] [--rates 1000,20000] [--seconds S]
                                                  [--event-stream file|memory|none] [--persist default|async]
                                                  [--agent-cpu N] [--sustain S] [--sustain-rate R]

1. Throughput under a connection storm: P processes in a scratch cgroup send N UDP datagrams each
   to distinct ports (flow folding off, so every datagram is a decision and an event). A separate
   subscriber process counts what arrives on NATS. Prints events/s end to end and checks that
   received + ring_buffer_full (the kernel's count of what it could not queue) == produced: zero
   unaccounted loss. Baseline in the same run: the rate at which the kernel produced them.
2. CPU and RSS of the agent at fixed event rates (paced senders), against the same agent idle
   over the same window (baseline).
3. The kernel-side producer (--synthetic-rounds times): events/s end to end, the same loss check,
   and the agent's CPU time per event. Each round is one burst: the ring buffer fills at once and
   the pipeline drains about 56k records, so a round lasts about half a second.
4. With --sustain S: the same producer paced at --sustain-rate records/s (above what the pipeline
   takes) for S seconds, so the end-to-end rate is the pipeline's sustained one, measured over
   seconds instead of one ring's worth.

--agent-cpu N gives the agent CPU N alone: the agent (all its threads) runs only there, and
nats-server, the subscriber, the producer and the senders only on the other CPUs. End to end is
then "on one core" literally: the agent cannot borrow the others' CPU, nor they its. (A child
the agent starts later, such as a restarted nats-server, would share the agent's CPU.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from loaders import cgroup as cg

REPO = Path(__file__).resolve().parents[1]
CLK = os.sysconf("SC_CLK_TCK")

# The subscriber speaks the NATS protocol itself (CONNECT, SUB, then MSG frames) so that it can
# count a few hundred thousand messages a second on its own core: a nats-py callback per message
# tops out near the rates measured here, which would make the benchmark measure its subscriber.
SUBSCRIBER = r"""
import json, re, socket, sys, time
from urllib.parse import urlsplit
url, expect, timeout, which = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
u = urlsplit(url)
sock = socket.create_connection((u.hostname, u.port))
f = sock.makefile("rb")
assert f.readline().startswith(b"INFO ")
sock.sendall(b"CONNECT " + json.dumps({"user": u.username, "pass": u.password, "verbose": False,
             "pedantic": False, "protocol": 1}).encode() + b"\r\n"
             b"SUB tool.events.*.connection.> 1\r\nSUB tool.events.*.process.> 2\r\nPING\r\n")
while (line := f.readline()) != b"PONG\r\n":
    assert not line.startswith(b"-ERR"), line
print("ready", flush=True)
STORM = which == "storm"
REMOTE_PORT = re.compile(rb'"remote":\{"address":"[^"]*","port":(\d+)')
PID = re.compile(rb'"process":\{"pid":(\d+)')
n = 0; first = last = None; procs = {}
buf = bytearray()

def parse(now):
    # Count the complete MSG frames in buf, answer PINGs, keep an incomplete frame.
    global n, first, last
    pos = 0
    while (nl := buf.find(b"\r\n", pos)) >= 0:
        if buf.startswith(b"MSG ", pos):
            head = bytes(buf[pos:nl]).split()
            start = nl + 2
            end = start + int(head[-1])
            if end + 2 > len(buf):
                break
            if head[2] == b"2":
                pid = PID.search(buf, start, end).group(1).decode()
                procs[pid] = procs.get(pid, 0) + 1
            elif not STORM or 20000 <= int(REMOTE_PORT.search(buf, start, end).group(1)) < 40000:
                first = now if first is None else first
                last = now
                n += 1
            pos = end + 2
        else:
            if buf.startswith(b"PING", pos):
                sock.sendall(b"PONG\r\n")
            pos = nl + 2
    del buf[:pos]

sock.settimeout(0.2)
deadline = time.monotonic() + timeout
tail_end = None  # after the last expected event: one more second for the senders' exit events
while True:
    now = time.monotonic()
    if now > deadline or (tail_end is not None and now > tail_end):
        break
    if tail_end is None and (n >= expect or (last is not None and now - last > 3.0)):
        tail_end = now + 1.0  # all in, or quiet for 3 s: what was lost is not coming
    try:
        data = sock.recv(1 << 20)
    except socket.timeout:
        continue
    if not data:
        break
    buf += data
    parse(time.monotonic())
print(json.dumps({"received": n, "seconds": (last - first) if first else 0.0, "first": first, "last": last,
                  "procs": procs}), flush=True)
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
    rounds, interval = line.split()
    rounds, interval = int(rounds), float(interval)  # interval: seconds between calls (0: back to back)
    start = time.monotonic()
    for i in range(rounds):
        os.getppid()
        if interval and (ahead := (i + 1) * interval - (time.monotonic() - start)) > 0:
            time.sleep(ahead)
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


def pin(cpus: set[int] | None) -> Any:
    """A preexec_fn that puts the child on ``cpus`` (None: leave it as it is)."""

    def preexec() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return preexec


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def pin_tree(pid: int, cpus: set[int]) -> list[str]:
    """Put every thread of ``pid``'s children (and theirs) on ``cpus``; their names.

    Only the children there now: one the agent starts later inherits the agent's CPU.
    """
    names = []
    for child in children(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # it exited meanwhile
            for tid in os.listdir(f"/proc/{child}/task"):
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setaffinity(int(tid), cpus)
            names.append(Path(f"/proc/{child}/comm").read_text().strip())
            names += pin_tree(child, cpus)
    return names


def start_agent(
    tmp: Path,
    cgroup_path: str,
    producer_pid: int,
    burst: int,
    event_stream: str,
    agent_cpus: set[int] | None,
    persist: str = "default",
) -> tuple[subprocess.Popen[bytes], Path]:
    state = tmp / "state"
    cfg = tmp / "config.yaml"
    cfg.write_text(  # default 8 MiB ring buffer
        f"flow_interval_ms: 0\naudit_log: ''\nloss_report_interval_s: 60\nevent_stream: {event_stream}\n"
        f"bench_producer_tgid: {producer_pid}\nbench_producer_burst: {burst}\n"
        # Only when asked for: a tree from before the setting existed refuses the key.
        + (f"event_stream_persist: {persist}\n" if persist != "default" else "")
    )
    err = (tmp / "agent.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "--config", str(cfg), "--cgroup", cgroup_path,
         "--state-dir", str(state), "--nats-port", "0"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=pin(agent_cpus),
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


OTHERS: set[int] | None = None  # with --agent-cpu: the CPUs of everything but the agent


def start_subscriber(state: Path, expect: int, which: str, timeout_s: float = 120.0) -> subprocess.Popen[str]:
    """An independent subscriber process, returned once its subscription is in place.

    Args:
        which: "storm" counts only the storm's destination ports; "all" counts every connection event.
        timeout_s: it stops counting after this long, whatever has arrived.
    """
    sub = subprocess.Popen(
        [sys.executable, "-c", SUBSCRIBER, consumer_url(state), str(expect), str(timeout_s), which],
        stdout=subprocess.PIPE, text=True, preexec_fn=pin(OTHERS),
    )  # fmt: skip
    assert sub.stdout is not None and sub.stdout.readline().strip() == "ready"
    return sub


def enter_pinned(cgroup_path: str) -> Any:
    """A preexec_fn: into the measured cgroup, and onto the other CPUs with --agent-cpu."""
    enter, place = cg.enter(cgroup_path), pin(OTHERS)

    def preexec() -> None:
        enter()
        place()

    return preexec


def storm(state: Path, cgroup_path: str, procs: int, per_proc: int) -> dict[str, float]:
    total = procs * per_proc
    wait_idle(state)
    before = kernel_counters(state)
    sub = start_subscriber(state, total, "storm")
    assert sub.stdout is not None
    t0 = time.monotonic()
    senders = [
        subprocess.Popen([sys.executable, "-c", SENDER, str(per_proc), "0", str(20000 + i * 500)],
                         preexec_fn=enter_pinned(cgroup_path))
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


class CpuSampler:
    """The agent's CPU time, sampled every 10 ms (the kernel counts it in ticks of 10 ms) in a
    thread, so that the share of a core it used can be taken over the window in which the
    subscriber received events (CLOCK_MONOTONIC is the same clock in every process)."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), agent_cpu_seconds(self._pid)))
            self._stop.wait(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, t: float) -> float:
        """CPU seconds at time ``t`` (the sample before it)."""
        before = [cpu for when, cpu in self.samples if when <= t]
        return before[-1] if before else self.samples[0][1]

    def share(self, start: float, end: float) -> float:
        """Percent of one core used from ``start`` to ``end``."""
        return 100 * (self.at(end) - self.at(start)) / max(end - start, 1e-9)


def synthetic(
    state: Path, producer: subprocess.Popen[str], calls: int, burst: int, agent_pid: int, interval: float = 0.0
) -> dict[str, float]:
    """Drive the pipeline from the kernel-side producer: calls x burst records, each call's burst as
    fast as the kernel emits, the calls back to back or ``interval`` seconds apart."""
    total = calls * burst
    wait_idle(state)
    before = kernel_counters(state)
    sub = start_subscriber(state, total, "all", timeout_s=max(120.0, 2 * calls * interval + 60))
    assert sub.stdout is not None and producer.stdin is not None and producer.stdout is not None
    t0 = time.monotonic()
    cpu0 = agent_cpu_seconds(agent_pid)
    sampler = CpuSampler(agent_pid)
    producer.stdin.write(f"{calls} {interval}\n")
    producer.stdin.flush()
    assert producer.stdout.readline().strip() == "done"
    produced_s = time.monotonic() - t0
    result = json.loads(sub.stdout.readline())
    sub.wait()
    busy = agent_cpu_seconds(agent_pid) - cpu0
    sampler.stop()
    after = kernel_counters(state)
    lost = after["ring_buffer_full"] - before["ring_buffer_full"]
    return {
        # while events arrived: from the subscriber's first event to its last
        "agent_cpu_percent": sampler.share(result["first"], result["last"]) if result["first"] else 0.0,
        "agent_us_per_event": 1e6 * busy / max(result["received"], 1),
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
                              preexec_fn=enter_pinned(cgroup_path))  # fmt: skip
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
    ap.add_argument(
        "--synthetic-rounds", type=int, default=3, help="times the kernel-side producer phase runs (median printed)"
    )
    ap.add_argument(
        "--event-stream",
        default="file",
        choices=("file", "memory", "none"),
        help="the agent's JetStream stream (its storage costs nats-server CPU per event)",
    )
    ap.add_argument(
        "--persist",
        default="default",
        choices=("default", "async"),
        help="event_stream_persist of a file stream (async: less nats-server CPU, see docs/nats.md)",
    )
    ap.add_argument(
        "--agent-cpu",
        type=int,
        default=None,
        help="run the agent alone on this CPU, everything else on the other CPUs (default: not pinned)",
    )
    ap.add_argument(
        "--sustain",
        type=float,
        default=0.0,
        help="also run the kernel-side producer for this many seconds at --sustain-rate (0: not)",
    )
    ap.add_argument("--sustain-rate", type=int, default=300_000, help="records/s offered by the sustained producer")
    args = ap.parse_args()
    global OTHERS
    agent_cpus = None
    if args.agent_cpu is not None:
        online = os.sched_getaffinity(0)
        if args.agent_cpu not in online or len(online) < 2:
            raise SystemExit(f"--agent-cpu {args.agent_cpu}: needs one of {sorted(online)}, and another CPU left")
        agent_cpus, OTHERS = {args.agent_cpu}, online - {args.agent_cpu}
    if args.persist == "async" and args.event_stream != "file":
        ap.error("--persist async needs --event-stream file")
    if args.sustain_rate <= 0:
        ap.error("--sustain-rate must be above 0")
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark attaches the sensors to a scratch cgroup")

    with tempfile.TemporaryDirectory() as tmpdir, cg.scratch_cgroup("toolbench") as cgroup_path:
        tmp = Path(tmpdir)
        producer = subprocess.Popen([sys.executable, "-c", PRODUCER, "0"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, preexec_fn=pin(OTHERS))  # fmt: skip
        assert producer.stdout is not None and producer.stdout.readline().strip() == "ready"
        proc, state = start_agent(
            tmp, cgroup_path, producer.pid, args.burst, args.event_stream, agent_cpus, args.persist
        )
        print(
            f"event stream: {args.event_stream}" + (f", persist {args.persist}" if args.event_stream == "file" else "")
        )
        if agent_cpus is not None and OTHERS is not None:
            moved = pin_tree(proc.pid, OTHERS)
            os.sched_setaffinity(0, OTHERS)  # this script and what it starts from now on (stats calls)
            print(
                f"agent alone on CPU {args.agent_cpu}; on CPUs {sorted(OTHERS)}: {', '.join(moved) or 'nothing'}, "
                "this script, the subscriber, the producer and the senders"
            )
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
            print(f"## Kernel-side synthetic producer: {args.synthetic} x {args.burst} records", end="")
            print(f", {args.synthetic_rounds} rounds")
            rounds = []
            for i in range(args.synthetic_rounds):
                y = synthetic(state, producer, args.synthetic, args.burst, proc.pid)
                rounds.append(y)
                print(
                    f"round {i + 1}: {y['pipeline_rate']:>7.0f}/s end to end, "
                    f"agent {y['agent_us_per_event']:5.2f} us/event, {y['received']} received, "
                    f"{y['ring_buffer_full']} counted full, {y['unaccounted']} unaccounted"
                )
            y = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
            print("median of the rounds:")
            print(f"kernel produced     {y['produced']:>9.0f} records   at {y['kernel_rate']:>9.0f}/s (baseline)")
            print(f"subscriber received {y['received']:>9.0f} events    at {y['pipeline_rate']:>9.0f}/s end to end")
            print(f"ring buffer full    {y['ring_buffer_full']:>9.0f} (counted by the kernel, reported as loss)")
            print(f"unaccounted         {max(r['unaccounted'] for r in rounds):>9} (the largest of the rounds)")
            print(f"agent cpu           {y['agent_cpu_percent']:>8.0f}% of one core while events arrived")
            per_core = 1e6 / y["agent_us_per_event"]
            print(f"agent cpu per event {y['agent_us_per_event']:>8.2f} us = {per_core:.0f} events/s per agent core")
            unaccounted = [s["unaccounted"]] + [r["unaccounted"] for r in rounds]
            if args.sustain > 0:
                calls = max(1, round(args.sustain * args.sustain_rate / args.burst))
                print()
                print(
                    f"## Kernel-side producer, sustained: {args.sustain_rate} records/s offered for {args.sustain:g} s"
                )
                z = synthetic(state, producer, calls, args.burst, proc.pid, interval=args.burst / args.sustain_rate)
                print(f"kernel produced     {z['produced']:>9.0f} records   at {z['kernel_rate']:>9.0f}/s (offered)")
                print(f"subscriber received {z['received']:>9.0f} events    at {z['pipeline_rate']:>9.0f}/s end to end")
                print(f"ring buffer full    {z['ring_buffer_full']:>9.0f} (counted by the kernel, reported as loss)")
                print(f"unaccounted         {z['unaccounted']:>9.0f}")
                print(f"agent cpu           {z['agent_cpu_percent']:>8.0f}% of one core while events arrived")
                print(
                    f"agent cpu per event {z['agent_us_per_event']:>8.2f} us = "
                    f"{1e6 / z['agent_us_per_event']:.0f} events/s per agent core"
                )
                unaccounted.append(z["unaccounted"])
            return 0 if not any(unaccounted) else 1
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            producer.kill()


if __name__ == "__main__":
    raise SystemExit(main())
