"""The ``policy`` command group: validate, explain, test, schema, diff and init."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from pipeline.policy.compiler import CompiledPolicy, compile_policy
from pipeline.policy.cue_schema import cue_schema_text
from pipeline.policy.diagnostics import PolicyError
from pipeline.policy.diff import diff_policies, group_changes
from pipeline.policy.evaluate import evaluate
from pipeline.policy.explain import explain
from pipeline.policy.flowspec import format_flow, parse_flow
from pipeline.policy.loader import load_policy
from pipeline.policy.schema import json_schema_text
from pipeline.policy.starter import STARTER_POLICY

MAX_DIFF_LINES = 40


def _compile(paths: Sequence[str], err: TextIO) -> CompiledPolicy | None:
    try:
        return compile_policy(load_policy([Path(p) for p in paths]))
    except PolicyError as exc:
        print(exc, file=err)
        return None


def cmd_validate(args: argparse.Namespace) -> int:
    """Check policy files; print every error with its position; 0 when valid."""
    out, err = sys.stdout, sys.stderr
    compiled = _compile(args.paths, err)
    if compiled is None:
        return 1
    for warning in compiled.warnings:
        print(f"warning: {warning}", file=err)
    print(f"ok: {len(compiled.rules)} rules", file=out)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Print a plain-language summary of a policy."""
    out, err = sys.stdout, sys.stderr
    compiled = _compile(args.paths, err)
    if compiled is None:
        return 1
    print(explain(compiled), file=out)
    return 0


def _load_cases(path: Path) -> list[dict[str, Any]]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    cases = data.get("cases") if isinstance(data, dict) else data
    if not isinstance(cases, list) or not all(isinstance(c, dict) and "flow" in c for c in cases):
        raise ValueError(
            f"{path}: expected a list of cases, each with 'flow' and 'expect' (and optional 'mode', 'rule')"
        )
    return cases


def cmd_test(args: argparse.Namespace) -> int:
    """Evaluate one flow (``--flow``) or a cases file (``--cases``) against a policy."""
    out, err = sys.stdout, sys.stderr
    compiled = _compile(args.paths, err)
    if compiled is None:
        return 1
    try:
        if args.flow:
            flow = parse_flow(args.flow)
            for mode in [args.mode] if args.mode else ["detect", "prevent"]:
                d = evaluate(compiled, flow, mode)
                print(f"{mode}: {d.verdict} ({d.explanation})", file=out)
            return 0
        cases = _load_cases(Path(args.cases))
    except (ValueError, OSError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=err)
        return 2
    failures = 0
    rows = []
    for case in cases:
        mode = str(case.get("mode", args.mode or "prevent"))
        try:
            decision = evaluate(compiled, parse_flow(str(case["flow"])), mode)
        except ValueError as exc:
            rows.append(("ERROR", str(case["flow"]), mode, str(case.get("expect", "")), str(exc)))
            failures += 1
            continue
        expected_rule = case.get("rule")
        got_rule = decision.rule_name or "(default)"
        ok = decision.verdict == case.get("expect") and (expected_rule is None or expected_rule == got_rule)
        failures += not ok
        got = f"{decision.verdict} by {got_rule}"
        want = f"{case.get('expect')}" + (f" by {expected_rule}" if expected_rule is not None else "")
        rows.append(("PASS" if ok else "FAIL", str(case["flow"]), mode, want, got))
    width = max((len(r[1]) for r in rows), default=4)
    print(f"{'':4}  {'flow':<{width}}  {'mode':<7}  {'expected':<28}  got", file=out)
    for status, flow_text, mode, want, got in rows:
        print(f"{status:4}  {flow_text:<{width}}  {mode:<7}  {want:<28}  {got}", file=out)
    print(f"{len(rows) - failures} passed, {failures} failed", file=out)
    return 1 if failures else 0


def cmd_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema or the CUE schema."""
    out = sys.stdout
    out.write(json_schema_text() if args.format == "json" else cue_schema_text())
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    """Show example flows whose verdict changes from OLD to NEW; exit 0 either way (1 on load error)."""
    out, err = sys.stdout, sys.stderr
    old, new = _compile([args.old], err), _compile([args.new], err)
    if old is None or new is None:
        return 1
    changes = diff_policies(old, new)
    if not changes:
        print("no verdict changes on the boundary flows of either policy", file=out)
        return 0
    groups = group_changes(changes)
    print(f"{len(changes)} boundary flows change verdict, in {len(groups)} kinds of change:", file=out)
    for change, count in groups[:MAX_DIFF_LINES]:
        before = f"{change.old.verdict} ({change.old.rule_name or 'default'})"
        after = f"{change.new.verdict} ({change.new.rule_name or 'default'})"
        print(
            f"  {change.mode:<7}  {before} -> {after}  [{count} flows], e.g. {format_flow(change.flow)}",
            file=out,
        )
    if len(groups) > MAX_DIFF_LINES:
        print(f"  ... and {len(groups) - MAX_DIFF_LINES} more kinds", file=out)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """Write the starter policy; refuse to overwrite an existing file."""
    out, err = sys.stdout, sys.stderr
    path = Path(args.path)
    if path.exists():
        print(f"error: {path} already exists; not overwriting it", file=err)
        return 1
    path.write_text(STARTER_POLICY, encoding="utf-8")
    print(f"wrote {path}; edit it, then run: tool-pipeline policy validate {path}", file=out)
    return 0


def register(subparsers: Any) -> None:
    """Add the ``policy`` command group to an argparse subparsers object.

    Each leaf parser sets ``func(args) -> int`` (the exit code).
    """
    policy = subparsers.add_parser("policy", help="check, explain and test network policies")
    sub = policy.add_subparsers(dest="policy_command", required=True)
    p = sub.add_parser("validate", help="check policy files; errors as file:line:column")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("explain", help="summarise a policy in plain language")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("test", help="decide flows against a policy")
    p.add_argument("paths", nargs="+", metavar="PATH")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--flow", help='e.g. "egress tcp 10.0.0.5:5432 exe=/usr/sbin/nginx user=www-data"')
    group.add_argument("--cases", help="YAML list of {flow, expect, mode?, rule?}")
    p.add_argument(
        "--mode",
        choices=["detect", "prevent"],
        help="agent mode (default: both for --flow, prevent for --cases)",
    )
    p.set_defaults(func=cmd_test)
    p = sub.add_parser("schema", help="print the policy schema")
    p.add_argument("--format", choices=["json", "cue"], default="json")
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("diff", help="show flows whose verdict changes between two policies")
    p.add_argument("old", metavar="OLD")
    p.add_argument("new", metavar="NEW")
    p.set_defaults(func=cmd_diff)
    p = sub.add_parser("init", help="write a commented starter policy")
    p.add_argument("path", nargs="?", default="policy.yaml", metavar="PATH")
    p.set_defaults(func=cmd_init)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``policy ...`` standalone (``python -m pipeline.policy.cli policy validate x.yaml``)."""
    parser = argparse.ArgumentParser(prog="tool-pipeline")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
