"""Generated files (JSON Schema, CUE schema) match their sources."""

from __future__ import annotations

from pathlib import Path

from pipeline.policy.cue_schema import GENERATED_HEADER, cue_schema_text
from pipeline.policy.schema import json_schema_text

ROOT = Path(__file__).resolve().parents[2]


def test_json_schema_file_is_up_to_date() -> None:
    """Regenerate with: tool-pipeline policy schema --format json > docs/policy.schema.json."""
    assert (ROOT / "docs" / "policy.schema.json").read_text() == json_schema_text()


def test_cue_schema_file_is_up_to_date() -> None:
    """Regenerate with: tool-pipeline policy schema --format cue > cue/policy/schema.cue."""
    text = (ROOT / "cue" / "policy" / "schema.cue").read_text()
    assert text == cue_schema_text()
    assert text.splitlines()[0] == GENERATED_HEADER
