"""OpenTelemetry output: metrics, one log record and one span per decision, spans per policy reload.

Exported over OTLP (gRPC or HTTP/protobuf), configured by the standard ``OTEL_*``
environment variables and by the ``opentelemetry`` section of the config file, which
wins where both set something. Providers are private to the exporter (nothing global is
installed). See docs/opentelemetry.md.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from pipeline.events import (
    SUBJECT_ROOT,
    ConnectionEvent,
    EnforcementEvent,
    Event,
    LossEvent,
    PolicyEvent,
    decoder,
)
from pipeline.outputs.nats_callbacks import confirm_subscriptions

_log = structlog.get_logger(__name__)

Protocol = Literal["grpc", "http/protobuf"]
Attributes = dict[str, AttributeValue]

SCOPE = "tool.pipeline.outputs.otel"
DEFAULT_PROTOCOL: Protocol = "http/protobuf"
DEFAULT_SERVICE_NAME = "tool"
LATENCY_BUCKETS_S = (
    0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
_HTTP_PATHS = {"traces": "/v1/traces", "metrics": "/v1/metrics", "logs": "/v1/logs"}
_SEVERITY: dict[str, tuple[SeverityNumber, str]] = {
    "allowed": (SeverityNumber.INFO, "INFO"),
    "alert": (SeverityNumber.WARN, "WARN"),
    "would-block": (SeverityNumber.WARN, "WARN"),
    "blocked": (SeverityNumber.WARN, "WARN"),
}


class OtelConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``opentelemetry`` section of the config file; unset fields fall back to ``OTEL_*``.

    Attributes:
        endpoint: collector base URL, e.g. ``http://collector:4318`` (HTTP; the signal
            paths ``/v1/traces`` ... are appended) or ``http://collector:4317`` (gRPC).
        protocol: ``grpc`` or ``http/protobuf``.
        headers: extra request headers / gRPC metadata (e.g. an API key).
        insecure: gRPC only: plaintext instead of TLS.
        service_name: ``service.name`` of the resource.
        timeout_s: export timeout per request.
        metric_interval_s: how often metrics are exported.
    """

    endpoint: str | None = None
    protocol: Protocol | None = None
    headers: dict[str, str] | None = None
    insecure: bool | None = None
    service_name: str | None = None
    timeout_s: float | None = None
    metric_interval_s: float | None = None

    @classmethod
    def from_mapping(cls, section: Mapping[str, object]) -> OtelConfig:
        """Validate a config-file section.

        Raises:
            msgspec.ValidationError: unknown key or wrong type.
        """
        return msgspec.convert(dict(section), cls)


def _protocol(config: OtelConfig, signal: str, environ: Mapping[str, str]) -> Protocol:
    value = (
        config.protocol
        or environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or DEFAULT_PROTOCOL
    ).strip()
    if value not in ("grpc", "http/protobuf"):
        raise ValueError(f"unsupported OTLP protocol {value!r}: use grpc or http/protobuf")
    return "grpc" if value == "grpc" else "http/protobuf"


def build_exporters(
    config: OtelConfig, environ: Mapping[str, str] | None = None
) -> tuple[SpanExporter, MetricExporter, LogRecordExporter]:
    """Build the OTLP span, metric and log exporters.

    Whatever ``config`` leaves unset is left to the exporters, which read the standard
    ``OTEL_EXPORTER_OTLP_*`` variables (endpoint, headers, certificates, compression, ...).

    Args:
        config: the config-file section.
        environ: where ``OTEL_EXPORTER_OTLP_*PROTOCOL`` is read (default ``os.environ``).

    Returns:
        The three exporters.
    """
    env = os.environ if environ is None else environ
    headers = dict(config.headers) if config.headers else None
    built: dict[str, object] = {}
    for signal in ("traces", "metrics", "logs"):
        if _protocol(config, signal, env) == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogs
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as GrpcMetrics,
            )
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpans

            grpc_kinds = {"traces": GrpcSpans, "metrics": GrpcMetrics, "logs": GrpcLogs}
            built[signal] = grpc_kinds[signal](
                endpoint=config.endpoint, insecure=config.insecure, headers=headers, timeout=config.timeout_s
            )
        else:
            from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogs
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter as HttpMetrics,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpans

            endpoint = config.endpoint.rstrip("/") + _HTTP_PATHS[signal] if config.endpoint else None
            http_kinds = {"traces": HttpSpans, "metrics": HttpMetrics, "logs": HttpLogs}
            built[signal] = http_kinds[signal](endpoint=endpoint, headers=headers, timeout=config.timeout_s)
    spans, metrics, logs = built["traces"], built["metrics"], built["logs"]
    assert isinstance(spans, SpanExporter)
    assert isinstance(metrics, MetricExporter)
    assert isinstance(logs, LogRecordExporter)
    return spans, metrics, logs


def build_resource(config: OtelConfig, environ: Mapping[str, str] | None = None) -> Resource:
    """The resource: ``service.name`` (config, then ``OTEL_SERVICE_NAME``, then ``tool``),
    ``host.name`` and ``OTEL_RESOURCE_ATTRIBUTES``."""
    env = os.environ if environ is None else environ
    attributes: dict[str, str] = {"host.name": socket.gethostname()}
    if config.service_name:
        attributes["service.name"] = config.service_name
    elif not env.get("OTEL_SERVICE_NAME") and "service.name=" not in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attributes["service.name"] = DEFAULT_SERVICE_NAME
    return Resource.create(attributes)


def _put(attrs: Attributes, key: str, value: AttributeValue | None) -> None:
    if value is not None and value != "":
        attrs[key] = value


def connection_attributes(event: ConnectionEvent) -> Attributes:
    """Semantic-convention and ``tool.*`` attributes of one decision (logs and spans)."""
    proc = event.process
    attrs: Attributes = {
        "network.transport": event.protocol.lower(),
        "network.peer.address": event.remote.address,
        "network.peer.port": event.remote.port,
        "network.local.address": event.local.address,
        "network.local.port": event.local.port,
        "process.pid": proc.pid,
        "process.parent_pid": proc.ppid,
        "process.user.id": proc.uid,
        "user.id": str(proc.uid),
        "tool.event.id": event.id,
        "tool.verdict": event.verdict,
        "tool.direction": event.direction,
        "tool.mode": event.mode,
        "tool.kind": event.kind,
        "tool.known": event.known,
        "tool.rule.id": event.rule.id,
        "tool.rule.name": event.rule.name
        or ("unknown/default" if event.rule.id == 0 else f"#{event.rule.id}"),
        "host.name": event.host,
    }
    if event.family in ("ipv4", "ipv6"):
        attrs["network.type"] = event.family
    exe_name = proc.exe.rsplit("/", 1)[-1] if proc.exe else proc.comm
    _put(attrs, "process.executable.path", proc.exe)
    _put(attrs, "process.executable.name", exe_name)
    _put(attrs, "process.command", proc.cmdline[0] if proc.cmdline else None)
    if proc.cmdline:
        attrs["process.command_args"] = list(proc.cmdline)
    _put(attrs, "user.name", proc.user)
    _put(attrs, "process.user.name", proc.user)
    _put(attrs, "tool.process.comm", proc.comm)
    _put(attrs, "tool.remote.name", event.remote.name)
    _put(attrs, "tool.rule.policy", event.rule.policy)
    _put(attrs, "tool.rule.explanation", event.rule.explanation)
    _put(attrs, "tool.cgroup.path", event.cgroup.path)
    _put(attrs, "tool.cgroup.systemd_unit", event.cgroup.systemd_unit)
    _put(attrs, "container.id", event.cgroup.container_id)
    if event.repeat:
        attrs["tool.repeat"] = event.repeat
    if event.anomaly is not None:
        attrs["tool.anomaly.score"] = event.anomaly.score
    return attrs


class OtelExporter:
    """Turns events into OTLP metrics, logs and spans.

    Args:
        config: the config-file section (or its mapping); unset fields fall back to ``OTEL_*``.
        ringbuffer_fill: returns the kernel ring buffer's fill ratio (0..1) for the
            ``tool.ringbuffer.fill`` gauge; may also be set later.
        environ: environment for protocol and resource resolution (default ``os.environ``).
    """

    def __init__(
        self,
        config: OtelConfig | Mapping[str, object] | None = None,
        *,
        ringbuffer_fill: Callable[[], float] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if config is None:
            config = OtelConfig()
        elif not isinstance(config, OtelConfig):
            config = OtelConfig.from_mapping(config)
        self.config = config
        self._fill = ringbuffer_fill
        self._decode_errors: dict[str, int] = {}
        self.events_handled = 0
        resource = build_resource(config, environ)
        span_exporter, metric_exporter, log_exporter = build_exporters(config, environ)

        self._tracer_provider = TracerProvider(resource=resource)
        self._tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        self._tracer = self._tracer_provider.get_tracer(SCOPE)

        self._logger_provider = LoggerProvider(resource=resource)
        self._logger_provider.add_log_record_processor(BatchLogRecordProcessor(log_exporter))
        self._logger = self._logger_provider.get_logger(SCOPE)

        interval = config.metric_interval_s * 1000 if config.metric_interval_s is not None else None
        reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=interval)
        self._meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        meter = self._meter_provider.get_meter(SCOPE)
        self._connections = meter.create_counter(
            "tool.connections", "{decision}", "Connection decisions, by verdict, direction and protocol"
        )
        self._unknown = meter.create_counter(
            "tool.connections.unknown", "{decision}", "Decisions where no rule matched (the default decided)"
        )
        self._blocked = meter.create_counter("tool.connections.blocked", "{decision}", "Connections blocked")
        self._shed = meter.create_counter(
            "tool.events.shed", "{event}", "Events the agent could not deliver, by reason"
        )
        self._gaps = meter.create_counter(
            "tool.events.sequence_gaps", "{event}", "Records missing from the kernel's per-CPU sequence"
        )
        self._latency = meter.create_histogram(
            "tool.stage.latency",
            "s",
            "Time an event spent in a pipeline stage",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        )
        self._reloads = meter.create_counter("tool.policy.reloads", "{reload}", "Policy reloads, by outcome")
        meter.create_observable_gauge(
            "tool.ringbuffer.fill", [self._observe_fill], "1", "Fill ratio of the kernel ring buffer (0..1)"
        )

    # -- feeding -----------------------------------------------------------------------------

    def set_ringbuffer_fill(self, callback: Callable[[], float] | None) -> None:
        """Set (or clear) the callback of the ``tool.ringbuffer.fill`` gauge."""
        self._fill = callback

    def record_stage_latency(self, stage: str, seconds: float) -> None:
        """Record one observation of ``tool.stage.latency``.

        Args:
            stage: the stage's name (keep the set small: it is a metric attribute).
            seconds: how long the event spent in it.
        """
        self._latency.record(seconds, {"stage": stage})

    def handle(self, event: Event) -> None:
        """Export whatever one event contributes."""
        self.events_handled += 1
        if isinstance(event, ConnectionEvent):
            self._connection(event)
        elif isinstance(event, LossEvent):
            self._loss(event)
        elif isinstance(event, PolicyEvent):
            self._policy(event)
        elif isinstance(event, EnforcementEvent):
            self._enforcement(event)

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Export everything pending now (blocking; run it in a worker thread from async code).

        Returns:
            True if all three signals flushed in time.
        """
        millis = int(timeout_s * 1000)
        spans = self._tracer_provider.force_flush(millis)
        logs = self._logger_provider.force_flush(millis)
        metrics = self._meter_provider.force_flush(millis)
        return bool(spans and logs and metrics)

    def shutdown(self) -> None:
        """Flush and stop all providers (blocking; idempotent enough to call once at exit)."""
        self._tracer_provider.shutdown()
        self._logger_provider.shutdown()
        self._meter_provider.shutdown()

    # -- per event ---------------------------------------------------------------------------

    def _connection(self, event: ConnectionEvent) -> None:
        decisions = 1 + event.repeat
        metric_attrs: Attributes = {
            "verdict": event.verdict,
            "direction": event.direction,
            "protocol": event.protocol,
        }
        self._connections.add(decisions, metric_attrs)
        if not event.known:
            self._unknown.add(decisions, metric_attrs)
        if event.verdict == "blocked":
            self._blocked.add(decisions, {"direction": event.direction, "protocol": event.protocol})

        attrs = connection_attributes(event)
        span = self._tracer.start_span(
            "connection.decision", kind=SpanKind.INTERNAL, attributes=attrs, start_time=event.time_ns
        )
        if event.verdict == "blocked":
            span.set_status(Status(StatusCode.ERROR, "blocked by policy"))
        span.end(end_time=event.time_ns)

        severity, text = _SEVERITY[event.verdict]
        rule_name = event.rule.name or ("unknown/default" if event.rule.id == 0 else f"#{event.rule.id}")
        remote = event.remote.name or event.remote.address
        body = (
            f"{event.verdict} {event.direction} {event.protocol} {event.process.comm or event.process.pid}"
            f" -> {remote}:{event.remote.port} (rule {rule_name}, {event.mode})"
        )
        self._logger.emit(
            LogRecord(
                timestamp=event.time_ns,
                observed_timestamp=time.time_ns(),
                context=trace.set_span_in_context(span),
                severity_number=severity,
                severity_text=text,
                body=body,
                attributes=attrs,
                event_name="tool.connection.decision",
            )
        )

    def _loss(self, event: LossEvent) -> None:
        if event.ring_buffer_full_delta > 0:
            self._shed.add(event.ring_buffer_full_delta, {"reason": "ring_buffer_full"})
        previous = self._decode_errors.get(event.host)
        self._decode_errors[event.host] = event.decode_errors
        decode_delta = event.decode_errors - (previous if previous is not None else 0)
        if decode_delta > 0:
            self._shed.add(decode_delta, {"reason": "decode_error"})
        if event.sequence_gaps_delta > 0:
            self._gaps.add(event.sequence_gaps_delta)

    def _policy(self, event: PolicyEvent) -> None:
        self._reloads.add(1, {"outcome": event.kind})
        attrs: Attributes = {
            "tool.policy.outcome": event.kind,
            "tool.policy.generation": event.generation,
            "tool.policy.rules": event.rules,
            "tool.policy.sources": list(event.sources),
            "tool.policy.duration_ms": event.duration_ms,
            "host.name": event.host,
            "tool.event.id": event.id,
        }
        if event.errors:
            attrs["tool.policy.errors"] = list(event.errors)
        start = event.time_ns - int(event.duration_ms * 1_000_000)
        span = self._tracer.start_span(
            "policy.reload", kind=SpanKind.INTERNAL, attributes=attrs, start_time=start
        )
        if event.kind == "rejected":
            span.set_status(Status(StatusCode.ERROR, "; ".join(event.errors) or "policy rejected"))
        span.end(end_time=event.time_ns)
        self._logger.emit(
            LogRecord(
                timestamp=event.time_ns,
                observed_timestamp=time.time_ns(),
                context=trace.set_span_in_context(span),
                severity_number=SeverityNumber.WARN if event.kind == "rejected" else SeverityNumber.INFO,
                severity_text="WARN" if event.kind == "rejected" else "INFO",
                body=f"policy generation {event.generation} {event.kind} ({event.rules} rules)",
                attributes=attrs,
                event_name="tool.policy.reload",
            )
        )

    def _enforcement(self, event: EnforcementEvent) -> None:
        attrs: Attributes = {
            "tool.enforcement.action": event.action,
            "tool.enforcement.reason": event.reason,
            "tool.enforcement.trigger_event": event.trigger_event,
            "host.name": event.host,
            "tool.event.id": event.id,
        }
        _put(attrs, "process.executable.path", event.exe)
        if event.remote is not None:
            attrs["network.peer.address"] = event.remote.address
            attrs["network.peer.port"] = event.remote.port
            _put(attrs, "tool.remote.name", event.remote.name)
        self._logger.emit(
            LogRecord(
                timestamp=event.time_ns,
                observed_timestamp=time.time_ns(),
                severity_number=SeverityNumber.WARN,
                severity_text="WARN",
                body=f"enforcement {event.action}: {event.reason}",
                attributes=attrs,
                event_name="tool.enforcement",
            )
        )

    def _observe_fill(self, _options: CallbackOptions) -> Iterable[Observation]:
        callback = self._fill
        if callback is None:
            return []
        try:
            return [Observation(float(callback()))]
        except Exception:
            _log.exception("ringbuffer_fill_callback_failed")
            return []


async def run_otel(
    nc: NATS,
    exporter: OtelExporter,
    subject: str = f"{SUBJECT_ROOT}.>",
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The OpenTelemetry stage: feed ``exporter`` from NATS until cancelled.

    The exporter is not shut down here: its owner calls
    ``await anyio.to_thread.run_sync(exporter.shutdown)`` at exit.

    Args:
        nc: connected nats-py client.
        exporter: where events go.
        subject: what to consume.
        task_status: signalled once subscribed.
    """

    async def on_msg(msg: Msg) -> None:
        try:
            event = decoder.decode(msg.data)
        except msgspec.DecodeError as error:
            _log.warning("otel_undecodable_event", subject=msg.subject, error=str(error))
            return
        exporter.handle(event)

    sub = await nc.subscribe(subject, cb=on_msg)
    try:
        await confirm_subscriptions(nc)
        task_status.started()
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            if nc.is_connected:
                await sub.unsubscribe()
