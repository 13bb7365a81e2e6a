"""The `policy` command group, run through its main function and once as a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.policy.cli import main
from pipeline.policy.flowspec import parse_flow

Write = Callable[..., Path]
ROOT = Path(__file__).resolve().parents[2]
GOOD = (
    "  rules:\n"
    "    - {name: db, action: allow, direction: egress, to: [10.0.0.5], ports: [postgres], protocol: tcp}\n"
)


def test_validate_ok(write_policy: Write, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "validate", str(write_policy(GOOD))]) == 0
    assert capsys.readouterr().out.strip() == "ok: 1 rules"


def test_validate_error_exit_1_with_position(write_policy: Write, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_policy(GOOD.replace("egress", "egres"))
    assert main(["policy", "validate", str(path)]) == 1
    assert f"{path}:6:" in capsys.readouterr().err


def test_validate_as_subprocess(write_policy: Write) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.policy.cli", "policy", "validate", str(write_policy(GOOD))],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0 and "ok: 1 rules" in proc.stdout


def test_explain_lists_rules_and_defaults(write_policy: Write, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "explain", str(write_policy(GOOD))]) == 0
    out = capsys.readouterr().out
    assert "allow any process to connect to 10.0.0.5 port postgres/tcp" in out
    assert "in prevent mode: egress denied" in out


def test_test_flow(write_policy: Write, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "test", str(write_policy(GOOD)), "--flow", "egress tcp 10.0.0.5:5432"]) == 0
    out = capsys.readouterr().out
    assert "detect: allowed" in out and "prevent: allowed" in out


def test_test_cases_mismatch_exits_1(
    write_policy: Write, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        '- {flow: "egress tcp 10.0.0.5:5432", expect: allowed, rule: db}\n'
        '- {flow: "egress tcp 10.0.0.6:5432", expect: allowed}\n'
    )
    assert main(["policy", "test", str(write_policy(GOOD)), "--cases", str(cases)]) == 1
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" in out and "1 passed, 1 failed" in out


def test_schema_formats(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "schema", "--format", "json"]) == 0
    assert '"$defs"' in capsys.readouterr().out
    assert main(["policy", "schema", "--format", "cue"]) == 0
    assert "#Policy:" in capsys.readouterr().out


def test_diff_shows_changed_flows(write_policy: Write, capsys: pytest.CaptureFixture[str]) -> None:
    old = write_policy(GOOD, "old.yaml")
    new = write_policy(GOOD.replace("10.0.0.5", "10.0.0.0/24"), "new.yaml")
    assert main(["policy", "diff", str(old), str(new)]) == 0
    out = capsys.readouterr().out
    assert "prevent  blocked (default) -> allowed (db)" in out and "egress tcp 10.0.0." in out


def test_diff_identical(write_policy: Write, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_policy(GOOD)
    assert main(["policy", "diff", str(path), str(path)]) == 0
    assert "no verdict changes" in capsys.readouterr().out


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    assert main(["policy", "init", str(path)]) == 0
    assert main(["policy", "init", str(path)]) == 1


def test_flow_syntax() -> None:
    flow = parse_flow("ingress udp [2001:db8::1]:53 exe=/usr/bin/x uid=7 gid=8 unit=a.service")
    assert (flow.direction, flow.protocol, flow.remote_addr, flow.port) == (
        "ingress",
        "udp",
        "2001:db8::1",
        53,
    )
    assert (flow.uid, flow.gid, flow.cgroup) == (7, 8, "system.slice/a.service")
    with pytest.raises(ValueError, match="direction"):
        parse_flow("outbound tcp 1.2.3.4:5")


def test_a_reader_that_goes_away_stops_the_command_quietly() -> None:
    """`tool-pipeline policy diff A B | head` must not end in a BrokenPipeError traceback."""
    examples = ROOT / "docs" / "policy-examples"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "policy", "diff", str(examples / "web-server.yaml"),
         str(examples / "ci-runner.yaml")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the diff is computed: its first write finds no reader
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr
