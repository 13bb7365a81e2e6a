"""House style is checked, not hoped for: ruff on the whole tree, mypy --strict on the product code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "pipeline", "loaders", "tests", "benchmarks", "examples"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict_on_the_product_code() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "pipeline", "loaders"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
