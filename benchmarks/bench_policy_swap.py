"""Benchmark: load, compile, build_tables and apply_policy of a 100k-rule policy, from YAML and from JSON.

Run as root: ``python benchmarks/bench_policy_swap.py [--rules 100000] [--swaps 3] [--compare-python]``.
Target (requirement): compiling and swapping a 100k-rule policy takes under 1 s: paths (c) to (e)
below, (d) being the hardest. For comparison the same run measures a 1k-rule policy and the full
paths from a file:

    (a) YAML file -> load -> compile -> build_tables -> apply
    (b) JSON file -> load -> compile -> build_tables -> apply
    (c) already-loaded policy -> compile -> build_tables -> apply
    (d) as (c), for a different policy of the same size each time
    (e) as (c), for the loaded policy with 1% of its rules edited (a typical reload)

``apply_policy`` writes only what differs from what the inactive slot already holds. In (a) to (c)
the slot holds the same policy from the swap before last, so the maps are hardly written; (d)
swaps in policies with other addresses, so every LPM node changes: the cost of a reload that
changes everything (the nodes then go into a fresh trie). Each (d) and (e) policy is loaded just
before, untimed, as a reload would have loaded it (loading also parses the addresses
that compiling uses). ``--compare-python`` repeats (d) with the native helper off (``TOOL_NATIVE=0``),
the baseline the helper is measured against.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path

import structlog
import yaml

from loaders import cgroup
from loaders.sensors import Sensors, build_tables
from pipeline.policy import compile_policy, load_policy
from pipeline.policy.loader import LoadedPolicy

TARGET_S = 1.0


def policy_document(n: int, seed: int = 1, edited: float = 0.0) -> dict[str, object]:
    """A policy of ``n`` deny rules on random /32 and /24 IPv4 destinations, plus an allow for loopback.

    ``edited``: the share of rules given another destination (the same ``seed`` otherwise gives
    the same policy).
    """
    rng = random.Random(seed)
    edits = random.Random(seed + 1000)
    rules: list[dict[str, object]] = [
        {"name": "loopback", "action": "allow", "direction": "egress", "to": ["127.0.0.0/8"]}
    ]
    for i in range(n - 1):
        a = rng.randrange(1 << 32)
        if edits.random() < edited:
            a = edits.randrange(1 << 32)
        net = (
            f"{a >> 24 & 255}.{a >> 16 & 255}.{a >> 8 & 255}.0/24"
            if i % 2
            else f"{a >> 24 & 255}.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}"
        )
        rules.append({"name": f"r{i}", "action": "deny", "direction": "egress", "to": [net], "protocol": "tcp"})
    meta = {"name": "bench"}
    return {"apiVersion": "tool/v1", "kind": "Policy", "metadata": meta, "spec": {"rules": rules}}


def write_policy(path: Path, n: int, seed: int = 1, edited: float = 0.0) -> None:
    """Write :func:`policy_document` as YAML (``.yaml``) or JSON (``.json``, indented like ``cue export``)."""
    doc = policy_document(n, seed, edited)
    if path.suffix == ".json":
        path.write_text(json.dumps(doc, indent=4))
    else:
        path.write_text(yaml.safe_dump(doc, sort_keys=False))


def swap(sensors: Sensors, loaded: LoadedPolicy, root: str) -> tuple[int, dict[str, float]]:
    """Compile, build and apply ``loaded``; return the entry count and each stage's seconds."""
    t0 = time.perf_counter()
    compiled = compile_policy(loaded)
    t1 = time.perf_counter()
    tables = build_tables(compiled, root)
    t2 = time.perf_counter()
    sensors.apply_policy(tables)
    t3 = time.perf_counter()
    # The kernel's count: reading compiled.entries would make the KernelRules the agent never needs.
    return tables.rule_entries, {"compile": t1 - t0, "build_tables": t2 - t1, "apply": t3 - t2}


def report(label: str, entries: int, stages: dict[str, float], target: float | None = None) -> None:
    total = sum(stages.values())
    parts = "  ".join(f"{name} {secs:.3f}s" for name, secs in stages.items())
    met = "MET" if target is not None and total < target else "NOT met"
    verdict = "" if target is None else f"  [{met}: target < {target:.1f}s]"
    print(f"{label:<34} {entries:>7} entries  {parts}  total {total:.3f}s{verdict}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", type=int, default=100_000)
    ap.add_argument("--swaps", type=int, default=3)
    ap.add_argument("--baseline-rules", type=int, default=1_000)
    ap.add_argument("--compare-python", action="store_true", help="repeat (d) with TOOL_NATIVE=0")
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory() as tmp, cgroup.scratch_cgroup("toolbench") as cgp:
        files = {}
        for n, tag in ((args.baseline_rules, "small"), (args.rules, "big")):
            for suffix in (".yaml", ".json"):
                files[(tag, suffix)] = Path(tmp) / f"{tag}{suffix}"
                write_policy(files[(tag, suffix)], n)
        others = [Path(tmp) / f"other{seed}.json" for seed in (2, 3)]
        for seed, other in enumerate(others, start=2):
            write_policy(other, args.rules, seed)
        edited = Path(tmp) / "edited.json"
        write_policy(edited, args.rules, 1, edited=0.01)
        root = cgroup.cgroup2_root()
        with Sensors.load(cgp, mode="detect") as sensors:
            print(f"target: compile + swap of {args.rules} rules in < {TARGET_S:.1f}s")
            for i in range(args.swaps):
                print(f"-- round {i}")
                for tag, n in (("small", args.baseline_rules), ("big", args.rules)):
                    target = TARGET_S if tag == "big" else None
                    for suffix, name in ((".yaml", "(a) YAML"), (".json", "(b) JSON")):
                        t0 = time.perf_counter()
                        loaded = load_policy([files[(tag, suffix)]])
                        load_s = time.perf_counter() - t0
                        entries, stages = swap(sensors, loaded, root)
                        report(f"{name} {n} rules, full", entries, {"load": load_s, **stages})
                    entries, stages = swap(sensors, loaded, root)
                    report(f"(c) parsed {n} rules, compile+swap", entries, stages, target)
                entries, stages = swap(sensors, load_policy([others[i % 2]]), root)
                report(f"(d) other {args.rules} rules, compile+swap", entries, stages, TARGET_S)
                if args.compare_python:
                    os.environ["TOOL_NATIVE"] = "0"
                    try:
                        entries, stages = swap(sensors, load_policy([others[(i + 1) % 2]]), root)
                    finally:
                        del os.environ["TOOL_NATIVE"]
                    report("(d) same, TOOL_NATIVE=0 (baseline)", entries, stages, TARGET_S)
                # (e): both slots get the unedited policy (untimed), then the edit goes into one.
                for policy in (loaded, loaded, load_policy([edited])):
                    entries, stages = swap(sensors, policy, root)
                report(f"(e) 1% of {args.rules} rules edited, swap", entries, stages, TARGET_S)


if __name__ == "__main__":
    main()
