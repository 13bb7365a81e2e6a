"""JSON Schema of the published events, generated from :mod:`pipeline.events`.

``docs/events.schema.json`` is the output of :func:`render_events_schema`; regenerate it
with ``python -m pipeline.bus.schema docs/events.schema.json`` (a test fails when it is
out of date).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from pipeline.events import EVENT_VERSION, Event

GENERATED_NOTE = (
    "Generated from pipeline/events.py by `python -m pipeline.bus.schema docs/events.schema.json`. "
    "Do not edit."
)


def events_json_schema() -> dict[str, Any]:
    """Return the JSON Schema of one message on ``tool.events.>`` (``msgspec.json.schema(Event)``).

    Returns:
        The schema, with ``$comment`` saying it is generated and ``title`` naming the version.
    """
    schema: dict[str, Any] = {
        "$comment": GENERATED_NOTE,
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"tool event, version {EVENT_VERSION}",
    }
    schema.update(msgspec.json.schema(Event))
    return schema


def render_events_schema() -> str:
    """Return the schema as the text stored in ``docs/events.schema.json``."""
    return json.dumps(events_json_schema(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the schema to the path given (or print it).

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        Exit status.
    """
    args = sys.argv[1:] if argv is None else argv
    text = render_events_schema()
    if args:
        Path(args[0]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
