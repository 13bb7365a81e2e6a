"""docs/events.schema.json is generated from pipeline.events and must be up to date."""

from __future__ import annotations

from pathlib import Path

import msgspec

from pipeline.bus.schema import events_json_schema, render_events_schema
from pipeline.events import Event

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "events.schema.json"


def test_schema_file_is_up_to_date() -> None:
    """Regenerate with: python -m pipeline.bus.schema docs/events.schema.json."""
    assert SCHEMA_PATH.read_text() == render_events_schema()


def test_schema_is_msgspec_schema_of_event() -> None:
    """The schema is msgspec's, plus a generated-file note and a title."""
    schema = events_json_schema()
    assert schema["$comment"].startswith("Generated")
    for key, value in msgspec.json.schema(Event).items():
        assert schema[key] == value
