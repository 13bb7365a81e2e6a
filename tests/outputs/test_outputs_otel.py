"""The OpenTelemetry output against a real OTLP receiver (gRPC and HTTP) fed from a real nats-server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import anyio
import msgspec
import nats
import pytest
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from otlp_receiver import OtlpReceiver, Received, any_value, attributes, grpc_receiver, http_receiver
from outputs_testkit import NatsServer, connection, free_port, loss, policy, wait_until

from pipeline.events import Event, encoder, subject_for
from pipeline.outputs.otel import OtelConfig, OtelExporter, run_otel

pytestmark = pytest.mark.anyio

Receiver = tuple[OtlpReceiver, str]


def metric(got: Received, name: str) -> Metric:
    """The last export of one metric."""
    found = [m for m in got.metrics if m.name == name]
    assert found, f"metric {name} not received; got {sorted({m.name for m in got.metrics})}"
    return found[-1]


def sums(got: Received, name: str) -> dict[frozenset[tuple[str, Any]], int]:
    """Data points of a counter, by attribute set."""
    return {frozenset(attributes(p.attributes).items()): p.as_int for p in metric(got, name).sum.data_points}


def has_all(got: Received) -> bool:
    """Every signal arrived: 3 decision + 2 reload spans, their logs, and the metrics."""
    names = {m.name for m in got.metrics}
    return (
        len(got.spans) >= 4
        and len(got.logs) >= 4
        and {"tool.connections", "tool.policy.reloads", "tool.ringbuffer.fill", "tool.stage.latency"} <= names
    )


@pytest.fixture(params=["grpc", "http/protobuf"])
def receiver(request: pytest.FixtureRequest) -> Iterator[tuple[str, OtlpReceiver, str]]:
    """A real OTLP receiver for each protocol."""
    factory: AbstractContextManager[Receiver] = grpc_receiver() if request.param == "grpc" else http_receiver()
    with factory as (rcv, endpoint):
        yield request.param, rcv, endpoint


async def feed(nats_server: NatsServer, exporter: OtelExporter, events: list[Event]) -> None:
    """Publish events as the agent does and wait until ``run_otel`` handled them, then flush."""
    agent = await nats.connect(nats_server.url)
    consumer = await nats.connect(nats_server.url)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(run_otel, consumer, exporter)
            for event in events:
                await agent.publish(subject_for(event), encoder.encode(event))
            await agent.flush()
            await wait_until(lambda: exporter.events_handled == len(events))
            tg.cancel_scope.cancel()
    finally:
        await agent.close()
        await consumer.close()
    assert await anyio.to_thread.run_sync(exporter.force_flush)


async def test_metrics_logs_and_spans_reach_the_collector(
    nats_server: NatsServer, receiver: tuple[str, OtlpReceiver, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    protocol, rcv, endpoint = receiver
    # the config file wins over the environment
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc" if protocol != "grpc" else "http/protobuf")
    config = {
        "endpoint": endpoint,
        "protocol": protocol,
        "insecure": True,
        "headers": {"x-api-key": "secret"},
        "service_name": "tool-test",
        "metric_interval_s": 3600,
    }
    exporter = OtelExporter(config, ringbuffer_fill=lambda: 0.25)
    try:
        exporter.record_stage_latency("decode", 0.002)
        events: list[Event] = [
            connection(1),
            connection(2, verdict="blocked", known=False),
            connection(3, verdict="would-block", known=False),
            loss(delta=5, total=5),
            policy("loaded", 3),
            policy("rejected", 4),
        ]
        await feed(nats_server, exporter, events)
        got = await anyio.to_thread.run_sync(lambda: rcv.wait_for(has_all))
    finally:
        await anyio.to_thread.run_sync(exporter.shutdown)

    assert all(r["service.name"] == "tool-test" for r in got.resources)
    assert all(h.get("x-api-key") == "secret" for h in got.headers)

    check_metrics(got)
    check_spans(got.spans)
    check_logs(got.logs, got.spans)


def check_metrics(got: Received) -> None:
    """Counters, gauge and histogram with their attributes."""
    connections = sums(got, "tool.connections")
    assert connections == {
        frozenset({("verdict", "allowed"), ("direction", "egress"), ("protocol", "tcp")}): 1,
        frozenset({("verdict", "blocked"), ("direction", "egress"), ("protocol", "tcp")}): 1,
        frozenset({("verdict", "would-block"), ("direction", "egress"), ("protocol", "tcp")}): 1,
    }
    assert sum(sums(got, "tool.connections.unknown").values()) == 2
    assert sums(got, "tool.connections.blocked") == {frozenset({("direction", "egress"), ("protocol", "tcp")}): 1}
    assert sums(got, "tool.events.shed") == {
        frozenset({("reason", "ring_buffer_full")}): 5,
        frozenset({("reason", "decode_error")}): 2,
    }
    assert sums(got, "tool.policy.reloads") == {
        frozenset({("outcome", "loaded")}): 1,
        frozenset({("outcome", "rejected")}): 1,
    }
    (fill,) = metric(got, "tool.ringbuffer.fill").gauge.data_points
    assert fill.as_double == 0.25
    (latency,) = metric(got, "tool.stage.latency").histogram.data_points
    assert attributes(latency.attributes) == {"stage": "decode"}
    assert latency.count == 1 and latency.sum == pytest.approx(0.002)
    assert metric(got, "tool.stage.latency").unit == "s"


def check_spans(spans: list[Span]) -> None:
    """A decision span per connection, a reload span per policy event."""
    decisions = {attributes(s.attributes)["tool.event.id"]: s for s in spans if s.name == "connection.decision"}
    assert set(decisions) == {"ev-0-1", "ev-0-2", "ev-0-3"}
    blocked = decisions["ev-0-2"]
    assert blocked.kind == Span.SPAN_KIND_INTERNAL
    assert blocked.start_time_unix_nano == connection(2).time_ns
    assert blocked.status.code == 2  # STATUS_CODE_ERROR
    assert decisions["ev-0-1"].status.code == 0
    attrs = attributes(blocked.attributes)
    assert attrs["network.transport"] == "tcp"
    assert attrs["network.type"] == "ipv4"
    assert attrs["network.peer.address"] == "93.184.216.34"
    assert attrs["network.peer.port"] == 443
    assert attrs["network.local.address"] == "10.0.0.5"
    assert attrs["network.local.port"] == 51234
    assert attrs["process.pid"] == 4242
    assert attrs["process.parent_pid"] == 1
    assert attrs["process.executable.path"] == "/usr/bin/curl"
    assert attrs["process.executable.name"] == "curl"
    assert attrs["process.command_args"] == ["curl", "-s", "https://example.com/"]
    assert attrs["user.id"] == "1000"
    assert attrs["user.name"] == "alice"
    assert attrs["tool.verdict"] == "blocked"
    assert attrs["tool.rule.name"] == "unknown/default"
    assert attrs["tool.rule.id"] == 0
    assert attrs["tool.mode"] == "prevent"
    assert attrs["tool.direction"] == "egress"
    assert attrs["tool.cgroup.path"] == "/user.slice/user-1000.slice"
    assert attrs["container.id"] == "c0ffee"
    assert attrs["tool.remote.name"] == "example.com"

    reloads = {attributes(s.attributes)["tool.policy.generation"]: s for s in spans if s.name == "policy.reload"}
    assert set(reloads) == {3, 4}
    loaded = reloads[3]
    assert loaded.end_time_unix_nano - loaded.start_time_unix_nano == 12_500_000
    assert attributes(loaded.attributes)["tool.policy.duration_ms"] == 12.5
    assert attributes(loaded.attributes)["tool.policy.outcome"] == "loaded"
    assert reloads[4].status.code == 2


def check_logs(logs: list[LogRecord], spans: list[Span]) -> None:
    """A log record per decision, with severity by verdict, tied to its span."""
    decisions = {
        attributes(r.attributes)["tool.event.id"]: r for r in logs if r.event_name == "tool.connection.decision"
    }
    assert set(decisions) == {"ev-0-1", "ev-0-2", "ev-0-3"}
    assert decisions["ev-0-1"].severity_text == "INFO"
    assert decisions["ev-0-2"].severity_text == "WARN"
    assert decisions["ev-0-3"].severity_text == "WARN"
    record = decisions["ev-0-2"]
    assert record.time_unix_nano == connection(2).time_ns
    assert any_value(record.body).startswith("blocked egress tcp curl -> example.com:443")
    assert attributes(record.attributes)["process.executable.path"] == "/usr/bin/curl"
    span = next(s for s in spans if attributes(s.attributes).get("tool.event.id") == "ev-0-2")
    assert record.trace_id == span.trace_id and record.span_id == span.span_id


async def test_configured_by_otel_environment_variables(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no config section, the standard OTEL_* variables decide endpoint, protocol, headers and name."""
    with http_receiver() as (rcv, endpoint):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-token=abc")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
        exporter = OtelExporter()
        try:
            await feed(nats_server, exporter, [connection(1)])
            got = await anyio.to_thread.run_sync(
                lambda: rcv.wait_for(lambda g: bool(g.spans) and bool(g.logs) and bool(g.metrics))
            )
        finally:
            await anyio.to_thread.run_sync(exporter.shutdown)
    assert {r["service.name"] for r in got.resources} == {"from-env"}
    assert all(h.get("x-token") == "abc" for h in got.headers)


def test_config_section_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(msgspec.ValidationError, match="endpont"):
        OtelConfig.from_mapping({"endpont": "http://x"})
    with pytest.raises(msgspec.ValidationError, match="protocol"):
        OtelExporter({"protocol": "http/json"})
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match="unsupported OTLP protocol"):
        OtelExporter()
