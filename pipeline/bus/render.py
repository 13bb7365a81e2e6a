"""One readable line per event, for ``tool-pipeline events`` and the consumer examples."""

from __future__ import annotations

import datetime

from pipeline.events import (
    ConnectionEvent,
    Endpoint,
    EnforcementEvent,
    Event,
    LossEvent,
    PolicyEvent,
    Process,
    ProcessEvent,
)


def format_time(time_ns: int, tz: datetime.tzinfo | None = None) -> str:
    """Format wall-clock nanoseconds as ``HH:MM:SS.mmm`` (local time unless ``tz``)."""
    moment = datetime.datetime.fromtimestamp(time_ns / 1e9, tz=tz)
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def _endpoint(endpoint: Endpoint) -> str:
    address = f"[{endpoint.address}]" if ":" in endpoint.address else endpoint.address
    text = f"{address}:{endpoint.port}"
    return f"{endpoint.name}({text})" if endpoint.name else text


def _process(process: Process) -> str:
    name = process.comm or (process.exe.rsplit("/", 1)[-1] if process.exe else "?")
    return f"{name}[{process.pid}] uid={process.uid}"


def format_event(event: Event, tz: datetime.tzinfo | None = None) -> str:
    """Render one event as a single line.

    Example: ``12:00:01.123 BLOCKED egress curl[1234] uid=1000 10.0.0.1:40000 ->
    1.2.3.4:443/tcp rule=deny-x``.

    Args:
        event: Any published event.
        tz: Time zone for the time stamp (default: local).

    Returns:
        The line, without a newline.
    """
    stamp = format_time(event.time_ns, tz)
    if isinstance(event, ConnectionEvent):
        rule = event.rule.name or (f"#{event.rule.id}" if event.rule.id else "default")
        arrow = "<-" if event.direction == "ingress" else "->"
        line = (
            f"{stamp} {event.verdict.upper()} {event.direction} {_process(event.process)} "
            f"{_endpoint(event.local)} {arrow} {_endpoint(event.remote)}/{event.protocol} rule={rule}"
        )
        if event.repeat:
            line += f" repeat={event.repeat}"
        if event.anomaly is not None:
            line += f" anomaly={event.anomaly.score:.2f}"
        return line
    if isinstance(event, ProcessEvent):
        line = f"{stamp} PROCESS {event.kind} {_process(event.process)}"
        if event.process.exe:
            line += f" exe={event.process.exe}"
        if event.exit_code is not None:
            line += f" exit_code={event.exit_code}"
        return line
    if isinstance(event, LossEvent):
        return (
            f"{stamp} LOSS ring_buffer_full={event.ring_buffer_full}(+{event.ring_buffer_full_delta}) "
            f"folded={event.folded}(+{event.folded_delta}) "
            f"sequence_gaps={event.sequence_gaps}(+{event.sequence_gaps_delta})"
        )
    if isinstance(event, PolicyEvent):
        line = (
            f"{stamp} POLICY {event.kind} generation={event.generation} rules={event.rules} "
            f"sources={','.join(event.sources)}"
        )
        if event.errors:
            line += f" errors={'; '.join(event.errors)}"
        return line
    assert isinstance(event, EnforcementEvent)
    line = f"{stamp} ENFORCE {event.action} reason={event.reason!r} trigger={event.trigger_event}"
    if event.exe:
        line += f" exe={event.exe}"
    if event.remote is not None:
        line += f" remote={_endpoint(event.remote)}"
    return line
