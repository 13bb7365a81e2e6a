"""Benchmark: what the audit log costs the agent, and its writer, per event.

Usage (as root): python benchmarks/bench_audit.py [--events N] [--runs R]

Runs ``tool-pipeline run`` on a scratch cgroup with flow folding off (every datagram is a
decision and an event), twice per run: with ``audit_log: ''`` (the baseline) and with the audit
log on. A process in the cgroup sends N UDP datagrams to a loopback port; once the agent is idle
again the script reads the CPU time the agent and the audit writer's process used, and counts
the CONN lines in the log (rotated files included). Every line must be there: lines + the
kernel's ``ring_buffer_full`` count == N.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loaders import cgroup as cg

PORT = 9
SENDER = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[1])):
    s.sendto(b"x", ("127.0.0.1", {PORT}))
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _log_events(stderr: Path, name: str) -> list[dict[str, object]]:
    out = []
    for line in stderr.read_text().splitlines():
        if f'"{name}"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def _wait_idle(pids: list[int], quiet_s: float = 1.0, timeout_s: float = 120.0) -> None:
    """Until none of the processes used CPU for ``quiet_s``."""
    deadline = time.monotonic() + timeout_s
    last = [cpu_seconds(p) for p in pids]
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = [cpu_seconds(p) for p in pids]
        if all(b - a < 0.02 for a, b in zip(last, now, strict=True)):
            return
        last = now


def one(events: int, audit: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp_dir, cg.scratch_cgroup("toolbench-audit") as path:
        tmp = Path(tmp_dir)
        log_path = tmp / "audit" / "audit.log"
        config = tmp / "config.yaml"
        config.write_text(
            "flow_interval_ms: 0\nloss_report_interval_s: 3600\n"
            + (f"audit_log: {log_path}\n" if audit else "audit_log: ''\n")
        )
        stderr = tmp / "agent.stderr"
        agent = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", "--config", str(config), "--cgroup", path,
             "--state-dir", str(tmp / "state"), "--nats-port", "0"],
            stdout=subprocess.DEVNULL, stderr=stderr.open("wb"),
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not _log_events(stderr, "agent_running"):
                if agent.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the agent did not start:\n{stderr.read_text()[-3000:]}")
                time.sleep(0.1)
            writers = [int(e["pid"]) for e in _log_events(stderr, "audit_writer_started")]  # type: ignore[call-overload]
            pids = [agent.pid, *writers]
            _wait_idle(pids)
            before = [cpu_seconds(p) for p in pids]
            subprocess.run([sys.executable, "-c", SENDER, str(events)], preexec_fn=cg.enter(path), check=True)
            _wait_idle(pids)
            after = [cpu_seconds(p) for p in pids]
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=60)
        lost = sum(int(e.get("ring_buffer_full", 0)) for e in _log_events(stderr, "events_lost"))  # type: ignore[call-overload]
        lines = 0
        if audit:
            for f in log_path.parent.glob("audit.log*"):
                with f.open(errors="replace") as fh:
                    lines += sum(1 for ln in fh if " CONN " in ln and f"->127.0.0.1:{PORT}/udp" in ln)
        delivered = events - lost
        return {
            "agent_us": (after[0] - before[0]) / delivered * 1e6,
            "writer_us": (after[1] - before[1]) / delivered * 1e6 if writers else 0.0,
            "lines": lines,
            "delivered": delivered,
            "lost": lost,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=50000, help="datagrams (decisions) per run")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    off: list[float] = []
    on: list[float] = []
    writer: list[float] = []
    ok = True
    for run in range(args.runs):
        base = one(args.events, audit=False)
        audited = one(args.events, audit=True)
        off.append(base["agent_us"])
        on.append(audited["agent_us"])
        writer.append(audited["writer_us"])
        complete = audited["lines"] == audited["delivered"]
        ok &= complete
        print(
            f"run {run + 1}: agent {base['agent_us']:6.1f} us/event without the audit log (baseline), "
            f"{audited['agent_us']:6.1f} with it; writer {audited['writer_us']:6.1f} us/line; "
            f"lines {int(audited['lines'])} of {int(audited['delivered'])} delivered "
            f"({int(audited['lost'])} counted lost at the ring buffer) {'ok' if complete else 'MISSING LINES'}"
        )
    print(
        f"median: agent {statistics.median(off):.1f} -> {statistics.median(on):.1f} us/event with the audit log "
        f"({statistics.median(on) / statistics.median(off):.2f}x the baseline); "
        f"writer {statistics.median(writer):.1f} us/line in its own process"
    )
    if not ok:
        raise SystemExit("audit lines are missing")


if __name__ == "__main__":
    main()
