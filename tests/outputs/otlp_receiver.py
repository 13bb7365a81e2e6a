"""A real, minimal OTLP receiver for tests: the three collector services over gRPC and HTTP/protobuf.

Every export request is decoded with the ``opentelemetry-proto`` messages and kept;
tests wait on a condition (no sleeps) until what they expect has arrived.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc  # type: ignore[import-untyped]
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span

Value = Any


def any_value(value: AnyValue) -> Value:
    """Turn an OTLP ``AnyValue`` into a plain Python value."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    if kind is None:
        return None
    return getattr(value, kind)


def attributes(pairs: Iterator[KeyValue] | Any) -> dict[str, Value]:
    """Turn repeated ``KeyValue`` into a dict."""
    return {kv.key: any_value(kv.value) for kv in pairs}


@dataclass
class Received:
    """Everything the receiver got, by signal, plus the resource attributes seen."""

    spans: list[Span] = field(default_factory=list)
    logs: list[LogRecord] = field(default_factory=list)
    metrics: list[Metric] = field(default_factory=list)
    resources: list[dict[str, Value]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    requests: int = 0


class OtlpReceiver:
    """Stores OTLP export requests; thread-safe, with a condition to wait on."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._got = Received()

    def add_traces(self, request: trace_service_pb2.ExportTraceServiceRequest, headers: dict[str, str]) -> None:
        """Keep the spans of one request."""
        with self._cond:
            for rs in request.resource_spans:
                self._got.resources.append(attributes(rs.resource.attributes))
                for ss in rs.scope_spans:
                    self._got.spans.extend(ss.spans)
            self._done(headers)

    def add_logs(self, request: logs_service_pb2.ExportLogsServiceRequest, headers: dict[str, str]) -> None:
        """Keep the log records of one request."""
        with self._cond:
            for rl in request.resource_logs:
                self._got.resources.append(attributes(rl.resource.attributes))
                for sl in rl.scope_logs:
                    self._got.logs.extend(sl.log_records)
            self._done(headers)

    def add_metrics(self, request: metrics_service_pb2.ExportMetricsServiceRequest, headers: dict[str, str]) -> None:
        """Keep the metrics of one request."""
        with self._cond:
            for rm in request.resource_metrics:
                self._got.resources.append(attributes(rm.resource.attributes))
                for sm in rm.scope_metrics:
                    self._got.metrics.extend(sm.metrics)
            self._done(headers)

    def _done(self, headers: dict[str, str]) -> None:
        self._got.headers.append(headers)
        self._got.requests += 1
        self._cond.notify_all()

    def wait_for(self, predicate: Callable[[Received], bool], timeout: float = 10.0) -> Received:
        """Block until ``predicate`` holds for what was received.

        Raises:
            TimeoutError: it did not within ``timeout`` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self._got), timeout):
                raise TimeoutError(f"OTLP receiver: condition not met after {timeout}s: {self._got.requests} requests")
            return self._got


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        self._receiver.add_traces(request, dict(context.invocation_metadata()))
        return trace_service_pb2.ExportTraceServiceResponse()


class _LogsService(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: Any, context: Any) -> logs_service_pb2.ExportLogsServiceResponse:
        self._receiver.add_logs(request, dict(context.invocation_metadata()))
        return logs_service_pb2.ExportLogsServiceResponse()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: Any, context: Any) -> metrics_service_pb2.ExportMetricsServiceResponse:
        self._receiver.add_metrics(request, dict(context.invocation_metadata()))
        return metrics_service_pb2.ExportMetricsServiceResponse()


@contextmanager
def grpc_receiver() -> Iterator[tuple[OtlpReceiver, str]]:
    """Run a gRPC OTLP receiver on a free localhost port.

    Yields:
        The receiver and its endpoint (``http://127.0.0.1:<port>``).
    """
    receiver = OtlpReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(receiver), server)  # type: ignore[no-untyped-call]
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_LogsService(receiver), server)  # type: ignore[no-untyped-call]
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsService(receiver), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver, f"http://127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def _http_handler(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            if self.headers.get("Content-Type") != "application/x-protobuf":
                self.send_error(415, "only application/x-protobuf")
                return
            response: bytes
            if self.path == "/v1/traces":
                receiver.add_traces(trace_service_pb2.ExportTraceServiceRequest.FromString(body), headers)
                response = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            elif self.path == "/v1/logs":
                receiver.add_logs(logs_service_pb2.ExportLogsServiceRequest.FromString(body), headers)
                response = logs_service_pb2.ExportLogsServiceResponse().SerializeToString()
            elif self.path == "/v1/metrics":
                receiver.add_metrics(metrics_service_pb2.ExportMetricsServiceRequest.FromString(body), headers)
                response = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(response)))
            self.end_headers()
            self.wfile.write(response)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def http_receiver() -> Iterator[tuple[OtlpReceiver, str]]:
    """Run an HTTP/protobuf OTLP receiver on a free localhost port.

    Yields:
        The receiver and its base endpoint (``http://127.0.0.1:<port>``).
    """
    receiver = OtlpReceiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _http_handler(receiver))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
