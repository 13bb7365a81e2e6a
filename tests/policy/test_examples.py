"""Every example policy in docs/ loads, and its cases file (where there is one) passes."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.policy import compile_policy, load_policy
from pipeline.policy.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "policy-examples"
POLICIES = [p for p in sorted(EXAMPLES.glob("*.yaml")) if not p.name.endswith(".cases.yaml")]
CASES = sorted(EXAMPLES.glob("*.cases.yaml"))


@pytest.mark.parametrize(
    "path",
    [*POLICIES, EXAMPLES / "split", ROOT / "pipeline" / "data" / "default-policy.yaml"],
    ids=lambda p: p.name,
)
def test_example_loads_and_compiles(path: Path) -> None:
    compiled = compile_policy(load_policy([path]))
    assert compiled.rules


@pytest.mark.parametrize("cases", CASES, ids=lambda p: p.name)
def test_example_cases_pass(cases: Path) -> None:
    policy = cases.with_name(cases.name.replace(".cases.yaml", ".yaml"))
    assert main(["policy", "test", str(policy), "--cases", str(cases)]) == 0


def test_starter_policy_is_valid(tmp_path: Path) -> None:
    assert main(["policy", "init", str(tmp_path / "p.yaml")]) == 0
    assert compile_policy(load_policy([tmp_path / "p.yaml"])).rules
