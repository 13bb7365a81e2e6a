"""The agent: sensors, the stage graph, NATS, and the subscribers (enforcement, audit, OTel, API).

``tool-pipeline run`` builds one :class:`Agent` and runs it until SIGTERM or
SIGINT (drain, then stop) while SIGHUP reloads the policy.
"""

from __future__ import annotations

import functools
import gc
import logging
import math
import os
import secrets
import signal
import socket
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import structlog
from nats.aio.client import Client as NATS

from loaders import cgroup as cg
from loaders.sensors import Sensors
from pipeline.bus.api import ApiError, ApiServer
from pipeline.bus.publish import Publisher
from pipeline.bus.server import EVENTS_STREAM, EmbeddedNats
from pipeline.bus.stream import StreamConfigError, ensure_stream, server_has_persist_modes, stream_config
from pipeline.cgroup_watch import CgroupWatcher
from pipeline.config import Config
from pipeline.enforce import Enforcer
from pipeline.events import EnforcementEvent, Event, LossEvent, PolicyEvent, encoder
from pipeline.hotpath import Encoded, EventEncoder
from pipeline.outputs.nats_callbacks import NatsConnectionEvents
from pipeline.policy import PolicyError, compile_policy, load_policy
from pipeline.policy_runtime import LoadResult, PolicyRuntime
from pipeline.score import Baseline
from pipeline.stages import (
    Batch,
    Enricher,
    EventBuilder,
    PipelineStats,
    enrich_stage,
    match_stage,
    ring_stage,
    score_stage,
)

log = structlog.get_logger("tool.agent")

CONTROL_ROOT = "tool.control"  # request/reply that changes the agent: agent credentials only
STREAM_BUFFER = 4  # batches (of at most stages.MAX_BATCH records) between stages
EVENT_BUFFER = 8  # events or batches of events into the publisher


class AgentStartError(Exception):
    """The agent cannot start; the message says why and what to do."""


def boot_offset_ns() -> int:
    """Wall clock minus CLOCK_BOOTTIME, to turn kernel timestamps into wall-clock time."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class Agent:
    """One running agent.

    Args:
        config: the merged configuration.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.host = config.hostname or socket.gethostname()
        self.instance = secrets.token_hex(4)
        self.stats = PipelineStats()
        self.sensors: Sensors | None = None
        self.runtime: PolicyRuntime | None = None
        self.nats_url = ""
        self.started = time.time()
        self._stop = anyio.Event()
        self._policy_changed = anyio.Event()  # set (and replaced) by every successful reload
        self._send_event: Any = None
        self._loss_prev = {"ring_buffer_full": 0, "folded": 0, "gaps": 0}
        self.publisher: Publisher | None = None
        self.exporter: Any = None  # pipeline.outputs.otel.OtelExporter when OpenTelemetry is on
        self.audit: Any = None  # pipeline.outputs.audit_process.AuditProcess when the audit log is on
        self.ready = anyio.Event()

    # ---- control ----

    def request_stop(self) -> None:
        """Begin a clean shutdown: drain in-flight events, then stop."""
        self._stop.set()

    async def reload_policy(self) -> LoadResult:
        """Reload the policy files; on failure the running policy stays in force. Publishes the outcome."""
        assert self.runtime is not None
        result = await anyio.to_thread.run_sync(self.runtime.load)
        await self._publish_policy_event(result)
        if result.ok:
            self._policy_changed.set()
            self._policy_changed = anyio.Event()
        return result

    async def _publish_policy_event(self, result: LoadResult, reason: str = "reload") -> None:
        event = PolicyEvent(
            id=f"{self.instance}-policy-{result.generation}-{int(time.time() * 1000)}",
            time_ns=time.time_ns(),
            host=self.host,
            kind="loaded" if result.ok else "rejected",
            sources=result.sources,
            generation=result.generation,
            rules=result.rules,
            errors=result.errors,
            duration_ms=round(result.duration_ms, 3),
            reason=reason,
        )
        if self._send_event is not None:
            await self._send_event.send(event)

    # ---- the run ----

    async def run(self, *, task_status: anyio.abc.TaskStatus[Agent] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`request_stop` (or SIGTERM/SIGINT when run from the CLI)."""
        c = self.config
        state = Path(c.state_dir)
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        cgroup_root = cg.cgroup2_root()

        # Check the policy before touching the kernel: a bad one at start is a clear error.
        runtime_check = PolicyRuntime(None, list(c.policy), cgroup_root)
        compile_policy(load_policy(runtime_check.paths))

        self.sensors = await anyio.to_thread.run_sync(
            lambda: Sensors.load(
                c.cgroup,
                ringbuf_bytes=c.ringbuf_bytes,
                mode=c.mode,
                flow_interval_ms=c.flow_interval_ms,
                bench_tgid=c.bench_producer_tgid,
                bench_burst=c.bench_producer_burst,
            )
        )
        try:
            self.runtime = PolicyRuntime(self.sensors, list(c.policy), cgroup_root)
            first = self.runtime.load()
            if not first.ok:  # the files changed between the check above and this load
                raise AgentStartError("the policy has errors, nothing is enforced:\n" + "\n".join(first.errors))
            seeded = self.sensors.seed_tasks()
            seeded_listeners = self.sensors.seed_listeners()
            for prog, why in self.sensors.missing.items():
                log.warning("feature_missing", program=prog, detail=why)
            log.info(
                "sensors_attached",
                cgroup=self.sensors.cgroup_path,
                mode=c.mode,
                seeded_processes=seeded,
                seeded_listeners=seeded_listeners,
                programs=len(self.sensors.links),
            )
            async with _bus(c, state) as url:
                self.nats_url = url
                await self._run_graph(url, first, task_status)
        finally:
            await anyio.to_thread.run_sync(self.sensors.close)
            log.info("sensors_detached")

    async def _run_graph(self, url: str, first: LoadResult, task_status: Any) -> None:
        c = self.config
        assert self.sensors is not None and self.runtime is not None
        callbacks = NatsConnectionEvents()
        nc = await nats.connect(
            url, max_reconnect_attempts=-1, name=f"tool-agent-{self.host}", **callbacks.connect_options()
        )
        subs_nc = await nats.connect(
            url, max_reconnect_attempts=-1, name=f"tool-outputs-{self.host}", **callbacks.connect_options()
        )
        try:
            await open_event_stream(nc, c)

            baseline = Baseline(Path(c.state_dir) / "baseline.json", warmup_observations=c.anomaly.warmup_observations)
            enricher = Enricher(cg.cgroup2_root())
            offset = boot_offset_ns()
            builder = EventBuilder(self.host, self.instance, offset)
            event_encoder = EventEncoder(self.host, self.instance, offset)

            dec_send, dec_recv = anyio.create_memory_object_stream[Batch](STREAM_BUFFER)
            enr_send, enr_recv = anyio.create_memory_object_stream[Batch](STREAM_BUFFER)
            mat_send, mat_recv = anyio.create_memory_object_stream[Batch](STREAM_BUFFER)
            ev_send, ev_recv = anyio.create_memory_object_stream[Event | list[Event] | Encoded](EVENT_BUFFER)
            self._send_event = ev_send.clone()
            # Confirmed means stored while the agent keeps a stream (docs/nats.md).
            self.publisher = Publisher(nc, ev_recv, stream_ack=None if c.event_stream == "none" else EVENTS_STREAM)

            # Everything made so far (modules, config, policy) lives as long as the agent: keep
            # it out of the garbage collector's full passes, which otherwise walk it again and
            # again while events flow (about a fifth of the per-event cost, docs/performance.md).
            gc.freeze()
            async with anyio.create_task_group() as outputs:
                # Subscribers first, so they see the first events.
                await self._start_outputs(outputs, subs_nc, callbacks)
                api = ApiServer(nc, self._api_handlers())
                await outputs.start(api.run)
                # Control operations change enforcement: only the agent's (root-only) credentials
                # may publish under tool.control.>, never a consumer.
                control_api = ApiServer(nc, self._control_handlers(), root=CONTROL_ROOT)
                await outputs.start(control_api.run)

                async with anyio.create_task_group() as graph:
                    await graph.start(self.publisher.run)
                    graph.start_soon(score_stage, mat_recv, ev_send, baseline, event_encoder, builder, self.stats)
                    graph.start_soon(match_stage, enr_recv, mat_send, self.runtime.describe, self.stats)
                    graph.start_soon(enrich_stage, dec_recv, enr_send, enricher, self.stats)
                    ring_drained = anyio.Event()
                    await graph.start(
                        functools.partial(
                            ring_stage,
                            self.sensors.maps["events"],
                            dec_send,
                            self._stop,
                            self.stats,
                            drained=ring_drained,
                        )
                    )

                    async with anyio.create_task_group() as control:
                        control.start_soon(self._signals)
                        control.start_soon(self._loss_reporter)
                        control.start_soon(self._policy_watcher)
                        await control.start(self._cgroup_watcher)
                        control.start_soon(self._baseline_saver, baseline)
                        await self._publish_policy_event(first, "start")
                        self.ready.set()
                        task_status.started(self)
                        log.info("agent_running", host=self.host, nats=_redact(url), mode=c.mode)
                        await self._stop.wait()
                        control.cancel_scope.cancel()
                    # Drain: the source empties the ring buffer and closes its stream; each stage
                    # finishes when its input ends; the publisher confirms everything. The final
                    # loss report counts what the drain saw too, so it waits for the drain.
                    await ring_drained.wait()
                    await self._report_loss(final=True)
                    await self._send_event.aclose()
                log.info(
                    "pipeline_drained",
                    events=self.stats.connection_events + self.stats.process_events,
                    published=self.publisher.counters().confirmed,
                )
                await anyio.to_thread.run_sync(baseline.save)
                if self.exporter is not None:
                    self.stats.observer = None
                    await anyio.to_thread.run_sync(self.exporter.shutdown)  # flushes metrics, logs, spans
                await nc.flush(timeout=5)
                with anyio.move_on_after(2):  # the outputs' last messages reach them before they stop
                    await subs_nc.flush()
                if self.audit is not None:  # after nc.flush: the server holds every event for it
                    await self.audit.stop()
                outputs.cancel_scope.cancel()
        finally:
            if self.audit is not None:  # on an error path it may still run (stop() is idempotent)
                await self.audit.stop()
            for conn in (subs_nc, nc):
                try:
                    await conn.drain()
                except Exception:
                    try:
                        await conn.close()
                    except Exception as exc:  # the server is already gone: nothing left to flush
                        log.warning("nats_close_failed", error=repr(exc))

    async def _start_outputs(self, tg: anyio.abc.TaskGroup, nc: NATS, callbacks: NatsConnectionEvents) -> None:
        c = self.config
        if c.audit_log:
            from pipeline.outputs.audit_process import AuditProcess, AuditSettings

            # Its own process: rendering and writing lines must not take the pipeline's core.
            # The agent's own URL: the writer is the agent's root-owned child, and confirming its
            # subscription needs a publish to its own inbox, which the subscribe-only consumer
            # user may not do (it could otherwise forge replies to other clients' requests).
            url = self.nats_url
            self.audit = AuditProcess(
                AuditSettings(
                    path=str(c.audit_log),
                    nats_url=url,
                    max_bytes=c.audit.max_bytes,
                    max_age_s=c.audit.max_age_s,
                    keep=c.audit.keep,
                    process_events=c.audit.process_events,
                    verbose=structlog.get_logger().bind().is_enabled_for(logging.DEBUG),
                )
            )
            await self.audit.start()
            tg.start_soon(self.audit.supervise)
        if c.otel_enabled or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or c.opentelemetry:
            from pipeline.outputs.otel import OtelExporter, run_otel

            assert self.sensors is not None
            exporter = OtelExporter(c.opentelemetry, ringbuffer_fill=self.sensors.ring_buffer_fill)
            self.stats.observer = exporter.record_stage_latency
            self.exporter = exporter
            await tg.start(run_otel, nc, exporter)
        if c.anomaly.action != "none":
            assert self.runtime is not None and self.sensors is not None
            sensors = self.sensors

            async def publish(ev: EnforcementEvent) -> None:
                await self._send_event.send(ev)

            enforcer = Enforcer(self.runtime, c.anomaly, lambda: sensors.mode, publish, self.host)
            await tg.start(enforcer.run, nc)

    # ---- control tasks ----

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("reload_requested", signal="SIGHUP")
                    await self.reload_policy()
                else:
                    log.info("shutdown_requested", signal=signal.Signals(signum).name)
                    self.request_stop()
                    return

    async def _policy_watcher(self) -> None:
        if not self.config.watch_policy:
            return
        assert self.runtime is not None
        while True:
            await anyio.sleep(1.0)
            if await anyio.to_thread.run_sync(self.runtime.changed):
                log.info("reload_requested", reason="policy file changed")
                await self.reload_policy()

    async def _cgroup_watcher(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Swap the policy in again when a cgroup its selectors match appears (a new container).

        Ready once the first watch is in place, so a cgroup made after the agent reports
        ``agent_running`` is seen. A watch is made for each policy that has cgroup selectors.
        """
        assert self.runtime is not None
        runtime = self.runtime
        root = cg.cgroup2_root()

        async def reapply(created: list[str]) -> None:
            log.info("cgroup_created", cgroups=created[:10], count=len(created))
            result = await anyio.to_thread.run_sync(runtime.reapply, f"cgroup created: {created[0]}")
            await self._publish_policy_event(result, "cgroup-created")

        started = False
        while True:
            changed = self._policy_changed
            patterns = runtime.cgroup_patterns()
            try:
                if patterns:
                    async with anyio.create_task_group() as tg:
                        await tg.start(CgroupWatcher(root, patterns, reapply).run)
                        if not started:
                            started = True
                            task_status.started()
                        # A cgroup made between the policy's resolution and the watch.
                        if await anyio.to_thread.run_sync(runtime.cgroups_moved):
                            await reapply(["(made before the watch started)"])
                        await changed.wait()  # a new policy may select other cgroups
                        tg.cancel_scope.cancel()
                    continue
            except* OSError as group:
                log.error(
                    "cgroup_watch_unavailable",
                    error=str(group.exceptions[0]),
                    advice="cgroups created from now on are resolved at the next reload; retrying in 60 s",
                )
            if not started:
                started = True
                task_status.started()
            with anyio.move_on_after(60 if patterns else math.inf):
                await changed.wait()

    async def _baseline_saver(self, baseline: Baseline) -> None:
        while True:
            await anyio.sleep(30)
            await anyio.to_thread.run_sync(baseline.save)

    async def _loss_reporter(self) -> None:
        while True:
            await anyio.sleep(self.config.loss_report_interval_s)
            await self._report_loss()

    def loss_counters(self) -> dict[str, int]:
        assert self.sensors is not None
        k = self.sensors.counters()
        return {
            "ring_buffer_full": k["ring_buffer_full"],
            "folded": k["folded"],
            "gaps": self.stats.gaps.lost,
            "decode_errors": self.stats.decode_errors,
        }

    async def _report_loss(self, final: bool = False) -> None:
        if final:
            self.stats.gaps.settle_all()
        now = self.loss_counters()
        prev = self._loss_prev
        event = LossEvent(
            id=f"{self.instance}-loss-{int(time.time() * 1000)}",
            time_ns=time.time_ns(),
            host=self.host,
            ring_buffer_full=now["ring_buffer_full"],
            ring_buffer_full_delta=now["ring_buffer_full"] - prev["ring_buffer_full"],
            folded=now["folded"],
            folded_delta=now["folded"] - prev["folded"],
            sequence_gaps=now["gaps"],
            sequence_gaps_delta=now["gaps"] - prev["gaps"],
            decode_errors=now["decode_errors"],
        )
        if event.ring_buffer_full_delta or event.sequence_gaps_delta:
            log.warning(
                "events_lost",
                ring_buffer_full=event.ring_buffer_full_delta,
                sequence_gaps=event.sequence_gaps_delta,
            )
        self._loss_prev = now
        await self._send_event.send(event)

    # ---- API ----

    def status(self) -> dict[str, Any]:
        assert self.sensors is not None and self.runtime is not None
        return {
            "host": self.host,
            "mode": self.sensors.mode,
            "uptime_s": round(time.time() - self.started, 1),
            "cgroup": self.sensors.cgroup_path,
            "policy_generation": self.runtime.generation,
            "policy_sources": [str(p) for p in self.runtime.paths],
            "programs_attached": sorted(self.sensors.links),
            "features_missing": self.sensors.missing,
            "nats": _redact(self.nats_url),
        }

    def statistics(self) -> dict[str, Any]:
        assert self.sensors is not None
        pub = self.publisher.counters() if self.publisher else None
        return {
            "kernel": self.sensors.counters(),
            "pipeline": {
                "records": self.stats.records,
                "connection_events": self.stats.connection_events,
                "process_events": self.stats.process_events,
                "decode_errors": self.stats.decode_errors,
                "sequence_gaps": self.stats.gaps.lost,
                "stage_seconds": {k: round(v, 3) for k, v in self.stats.stage_seconds.items()},
            },
            "publisher": msgspec.structs.asdict(pub) if pub else {},
        }

    def _api_handlers(self) -> dict[str, Any]:
        async def status(_: bytes) -> bytes:
            return encoder.encode(self.status())

        async def stats(_: bytes) -> bytes:
            return encoder.encode(self.statistics())

        async def policy(_: bytes) -> bytes:
            assert self.runtime is not None
            compiled = self.runtime.compiled
            rules = (
                []
                if compiled is None
                else [
                    {
                        "id": rid,
                        "name": r.name,
                        "action": r.action,
                        "audit": r.audit,
                        "source": r.source,
                        "explanation": r.explanation,
                    }
                    for rid, r in sorted(compiled.rules.items())
                ]
            )
            return encoder.encode(
                {
                    "generation": self.runtime.generation,
                    "sources": [str(p) for p in self.runtime.paths],
                    "defaults": compiled.defaults if compiled else {},
                    "rules": rules,
                    "dynamic_denies": [
                        {"exe": d.exe, "address": str(d.network), "port": d.port, "reason": d.reason}
                        for d in self.runtime.dynamic
                    ],
                }
            )

        async def validate(body: bytes) -> bytes:
            return encoder.encode(await anyio.to_thread.run_sync(validate_policy_text, body))

        return {"status": status, "stats": stats, "policy": policy, "policy.validate": validate}

    def _control_handlers(self) -> dict[str, Any]:
        async def mode(body: bytes) -> bytes:
            want = body.decode(errors="replace").strip()
            if want not in ("detect", "prevent"):
                raise ApiError(f"mode must be 'detect' or 'prevent', not {want!r}", where="body")
            assert self.sensors is not None
            self.sensors.set_mode(want)
            log.warning("mode_changed", mode=want)
            return encoder.encode({"mode": want})

        async def reload(_: bytes) -> bytes:
            result = await self.reload_policy()
            return encoder.encode({"ok": result.ok, "generation": result.generation, "errors": result.errors})

        return {"mode": mode, "policy.reload": reload}


async def open_event_stream(nc: NATS, c: Config) -> None:
    """Create or update the events stream as ``c`` says; a failure is logged, never fatal.

    Live subscribers get every event whatever happens here; the publisher finds out by itself
    whether a stream stores them (docs/nats.md). Persist mode async on a server older than 2.12
    is logged and left out, at every start: such a server would ignore it anyway, and asking
    for it would make the stream look like it needs recreating.
    """
    if c.event_stream == "none":
        log.info("event_stream_none", advice="live subscribers only; an existing stream is left as it is")
        return
    persist = c.event_stream_persist
    version = _server_version(nc)
    if persist == "async" and not server_has_persist_modes(version):
        log.warning(
            "event_stream_persist_ignored",
            server_version=version,
            advice="persist mode async needs nats-server 2.12 or later; the stream persists as by default",
        )
        persist = "default"
    try:
        await ensure_stream(nc.jetstream(), stream_config(storage=c.event_stream, persist=persist))
    except StreamConfigError as exc:  # the stream, if there is one, keeps working as it is
        log.error("event_stream_not_configured", error=str(exc))
    except Exception as exc:  # a server without JetStream still gets the live stream
        log.warning("jetstream_unavailable", error=str(exc))


def _server_version(nc: NATS) -> str:
    """The connected server's version as "major.minor.patch" ("" when it cannot be read)."""
    v = nc.connected_server_version
    try:
        return f"{v.major}.{v.minor}.{v.patch}"
    except (ValueError, TypeError):
        return ""


def validate_policy_text(body: bytes) -> dict[str, Any]:
    """Validate a policy sent in an API request (YAML or JSON text)."""
    import tempfile

    if not body.strip():
        raise ApiError("empty request: send the policy text (YAML or JSON) as the body", where="body")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "request.yaml"
        path.write_bytes(body)
        try:
            compiled = compile_policy(load_policy([path]))
        except PolicyError as exc:
            return {
                "valid": False,
                "errors": [
                    {"line": e.line, "column": e.column, "message": e.message, "hint": e.hint} for e in exc.errors
                ],
            }
    return {"valid": True, "rules": len(compiled.rules), "warnings": compiled.warnings}


def _redact(url: str) -> str:
    if "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


class _bus:
    """The NATS URL to use: an external server (--nats) or the embedded one."""

    def __init__(self, c: Config, state: Path) -> None:
        self.c = c
        self.state = state
        self.server: EmbeddedNats | None = None

    async def __aenter__(self) -> str:
        if self.c.nats:
            if self.c.nats_credentials:
                return Path(self.c.nats_credentials).read_text().strip()
            return self.c.nats
        self.server = EmbeddedNats(self.state, port=self.c.nats_port)
        await self.server.start()
        log.info("nats_embedded", url=self.server.url, credentials=str(self.state / "credentials"))
        return self.server.credentials["agent"].url_with_auth()

    async def __aexit__(self, *exc: object) -> None:
        if self.server is not None:
            await self.server.stop()
