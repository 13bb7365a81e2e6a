"""Benchmark: compile + build_tables + apply_policy of a 100k-rule policy (from YAML, and the kernel write).

Run as root: ``python benchmarks/bench_policy_swap.py [--rules 100000]``. Target: under 1 s.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import yaml

from loaders import cgroup
from loaders.sensors import Sensors, build_tables
from pipeline.policy import compile_policy, load_policy


def write_policy(path: Path, n: int, seed: int = 1) -> None:
    """A policy of ``n`` deny rules on random /32 and /24 IPv4 destinations, plus an allow for loopback."""
    rng = random.Random(seed)
    rules: list[dict[str, object]] = [
        {"name": "loopback", "action": "allow", "direction": "egress", "to": ["127.0.0.0/8"]}
    ]
    for i in range(n - 1):
        a = rng.randrange(1 << 32)
        net = (
            f"{a >> 24 & 255}.{a >> 16 & 255}.{a >> 8 & 255}.0/24"
            if i % 2
            else f"{a >> 24 & 255}.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}"
        )
        rules.append(
            {"name": f"r{i}", "action": "deny", "direction": "egress", "to": [net], "protocol": "tcp"}
        )
    doc = {"apiVersion": "tool/v1", "kind": "Policy", "metadata": {"name": "bench"}, "spec": {"rules": rules}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", type=int, default=100_000)
    ap.add_argument("--swaps", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, cgroup.scratch_cgroup("toolbench") as cgp:
        path = Path(tmp) / "policy.yaml"
        write_policy(path, args.rules)
        with Sensors.load(cgp, mode="detect") as sensors:
            root = cgroup.cgroup2_root()
            for i in range(args.swaps):
                t0 = time.perf_counter()
                loaded = load_policy([path])
                t1 = time.perf_counter()
                compiled = compile_policy(loaded)
                t2 = time.perf_counter()
                tables = build_tables(compiled, root)
                t3 = time.perf_counter()
                sensors.apply_policy(tables)
                t4 = time.perf_counter()
                print(
                    f"swap {i}: {len(compiled.entries)} entries  load {t1 - t0:.3f}s  "
                    f"compile {t2 - t1:.3f}s  "
                    f"build_tables {t3 - t2:.3f}s  apply (kernel write) {t4 - t3:.3f}s  "
                    f"compile+tables+apply {t4 - t1:.3f}s  full {t4 - t0:.3f}s"
                )


if __name__ == "__main__":
    main()
