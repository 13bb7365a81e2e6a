"""`tool-pipeline doctor` on this host: every check passes, and --json parses."""

from __future__ import annotations

import argparse
import io
import json

import pytest
import structlog

from loaders import doctor

pytestmark = pytest.mark.kernel


def test_doctor_passes_here_with_all_lines_ok() -> None:
    out = io.StringIO()
    assert doctor.run_doctor(out) == 0
    lines = out.getvalue().splitlines()[1:-1]
    statuses = {line.split()[0]: line for line in lines if "->" not in line}
    assert not [line for line in lines if " FAIL " in line or " WARN " in line], out.getvalue()
    assert any("cgroup/connect4" in line and " OK " in line for line in lines)
    assert statuses


def test_doctor_json_parses_and_names_every_probe() -> None:
    out = io.StringIO()
    assert doctor.run_doctor(out, as_json=True) == 0
    report = json.loads(out.getvalue())
    assert report["ok"] is True
    names = {check["name"] for check in report["checks"]}
    assert {label for _, label, _ in doctor.PROGRAM_PROBES} <= names
    assert {"map ringbuf", "map lpm_trie", "kernel", "btf", "cgroup2", "bpffs", "capabilities"} <= names


def test_doctor_registers_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="tool-pipeline")
    doctor.register(parser.add_subparsers())
    args = parser.parse_args(["doctor", "--json"])
    with structlog.testing.capture_logs():  # keep libbpf's debug log out of stdout
        assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
