"""Shared fixtures for policy tests: writing small policies and finding the cue CLI."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

HEADER = "apiVersion: tool/v1\nkind: Policy\nmetadata: {name: t}\nspec:\n"


@pytest.fixture
def write_policy(tmp_path: Path) -> Callable[[str, str], Path]:
    """Return a function writing ``spec`` (indented YAML under ``spec:``) to a named file."""

    def write(spec: str, name: str = "policy.yaml") -> Path:
        path = tmp_path / name
        path.write_text(HEADER + spec, encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def cue_exe() -> str:
    """The cue CLI; skipped when absent unless REQUIRE_CUE=1, where absence fails."""
    found = os.environ.get("TOOL_CUE") or shutil.which("cue")
    if found is None:
        if os.environ.get("REQUIRE_CUE") == "1":
            pytest.fail("cue CLI not found and REQUIRE_CUE=1; run deploy/cue/install.sh")
        pytest.skip("cue CLI not installed (deploy/cue/install.sh); set REQUIRE_CUE=1 to make this a failure")
    return found
