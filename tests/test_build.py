"""The committed BPF objects are exactly what their sources build to (pinned clang-19, fixed flags)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_committed_bpf_objects_match_their_sources() -> None:
    """`make -C bpf check` rebuilds every object into a scratch directory and compares bytes."""
    if shutil.which("clang-19") is None or shutil.which("llvm-strip-19") is None:
        pytest.fail("clang-19 and llvm-strip-19 are needed to check the objects: run deploy/setup.sh --test")
    out = subprocess.run(["make", "-s", "-C", str(REPO / "bpf"), "check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "committed objects match their sources" in out.stdout


def test_committed_native_helper_matches_its_source() -> None:
    """`make -C loaders/csrc check` rebuilds the policy-swap helper and compares bytes."""
    if shutil.which("clang-19") is None:
        pytest.fail("clang-19 is needed to check the native helper: run deploy/setup.sh --test")
    out = subprocess.run(["make", "-s", "-C", str(REPO / "loaders" / "csrc"), "check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "committed library matches its source" in out.stdout
