"""The audit log: one grep-friendly line per decision, readable by root only, nothing lost silently.

:class:`AuditWriter` formats events (see :mod:`pipeline.outputs.audit_format`) into a
:class:`~pipeline.outputs.audit_file.SecureRotatingFile` and writes a ``GAP`` line whenever
the per-(host, CPU) kernel sequence numbers show that events are missing.
:class:`AuditSubscriber` feeds it from NATS and records the connection's outages;
:func:`run_audit` is the stage for the pipeline's graph.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import SlowConsumerError

from pipeline.events import (
    SUBJECT_ROOT,
    ConnectionEvent,
    EnforcementEvent,
    Event,
    LossEvent,
    PolicyEvent,
    ProcessEvent,
    decoder,
)
from pipeline.outputs import audit_format as fmt
from pipeline.outputs.audit_file import SecureRotatingFile
from pipeline.outputs.nats_callbacks import NatsConnectionEvents, confirm_subscriptions

_log = structlog.get_logger(__name__)

MiB = 1024 * 1024
DEFAULT_MAX_BYTES = 50 * MiB
DEFAULT_MAX_AGE_S = 86400.0
DEFAULT_KEEP = 10
DEFAULT_SUBJECT = f"{SUBJECT_ROOT}.>"

HOLD_MAX_BYTES = 256 * 1024
"""At most this much of a burst is held before it is written."""

REASON_UPSTREAM = "not-published"
"""Gap reason when the audit saw no outage of its own: the agent did not publish them."""


@dataclass(frozen=True)
class Gap:
    """A run of sequence numbers that never arrived from one CPU of one host."""

    host: str
    cpu: int
    first: int
    last: int
    reason: str

    @property
    def missing(self) -> int:
        """How many events are missing."""
        return self.last - self.first + 1


@dataclass(frozen=True)
class Reset:
    """A CPU's sequence went backwards: the agent (or its kernel programs) restarted."""

    host: str
    cpu: int
    previous: int
    seq: int


class SequenceTracker:
    """Follows the per-(host, CPU) ``seq`` of kernel-sourced events and finds what is missing.

    Per CPU the sequence increases by one for every record (connection and process
    events share it); across CPUs events may arrive in any order. A ``seq`` of 0 means
    "not numbered" and is ignored. Outages noted with :meth:`disruption` name the reason
    of the gaps that span them.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[str, int], tuple[int, int]] = {}
        self._disruptions: list[str] = []

    def disruption(self, reason: str) -> None:
        """Note that events may have been missed from now on, and why."""
        self._disruptions.append(reason)

    def observe(self, host: str, cpu: int, seq: int) -> Gap | Reset | None:
        """Account for one event.

        Returns:
            The gap before this event, a reset of the sequence, or None.
        """
        if seq <= 0:
            return None
        key = (host, cpu)
        mark = len(self._disruptions)
        previous = self._last.get(key)
        self._last[key] = (seq, mark)
        if previous is None:
            return None
        last, seen_mark = previous
        if seq == last + 1 or seq == last:
            return None
        if seq < last:
            return Reset(host, cpu, last, seq)
        reasons = sorted(set(self._disruptions[seen_mark:mark])) or [REASON_UPSTREAM]
        return Gap(host, cpu, last + 1, seq - 1, ",".join(reasons))


class AuditWriter:
    """Writes the audit log.

    Args:
        path: the log file (for example ``/var/log/tool/audit.log``); its directory is
            made 0700 and belongs to the audit log.
        max_bytes: rotate before the file would grow past this size.
        max_age_s: rotate when the current file is this old.
        keep: rotated files kept (``audit.log.1`` newest ... ``audit.log.<keep>``).
        process_events: also write ``EXEC``/``EXIT`` lines (their ``seq`` is tracked anyway).
        fsync: fsync after every line (slower; survives a power cut).
        clock: wall clock in seconds, replaceable for tests.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        keep: int = DEFAULT_KEEP,
        process_events: bool = False,
        fsync: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._process_events = process_events
        self._fsync = fsync
        self._tracker = SequenceTracker()
        self._connection_lines = fmt.ConnectionLines()
        self._pending_notes: list[str] = []
        self._unwritten = 0
        self._last_error = ""
        self._holding = False
        self._held: list[bytes] = []  # lines of a burst, written together by release()
        self._held_bytes = 0
        self.lines_written = 0
        self.gaps_missing = 0
        self._file: SecureRotatingFile | None = None
        self._file = SecureRotatingFile(
            path, max_bytes=max_bytes, max_age_s=max_age_s, keep=keep, clock=clock, notes=self._file_note
        )
        self._emit(self._now_line("AUDIT", [("event", "started"), ("pid", os.getpid())]))

    @property
    def path(self) -> Path:
        """The current log file."""
        return self._writer_file().path

    # -- public ----------------------------------------------------------------------------

    def write(self, event: Event) -> None:
        """Write the line(s) for one event, preceded by a ``GAP``/``SEQRESET`` line if due."""
        if isinstance(event, ConnectionEvent | ProcessEvent):
            self._sequence(event.host, event.cpu, event.seq, event.time_ns)
        if isinstance(event, ConnectionEvent):
            self._emit(fmt.connection_line(event))
        elif isinstance(event, ProcessEvent):
            if self._process_events:
                self._emit(fmt.process_line(event))
        elif isinstance(event, LossEvent):
            self._emit(fmt.loss_line(event))
        elif isinstance(event, PolicyEvent):
            self._emit(fmt.policy_line(event))
        elif isinstance(event, EnforcementEvent):
            self._emit(fmt.enforcement_line(event))

    def write_connection(self, data: bytes) -> None:
        """Write the line of one published connection event, straight from its JSON.

        Raises:
            msgspec.DecodeError: ``data`` is not a connection event.
        """
        text, host, cpu, seq, time_ns = self._connection_lines.line(data)
        self._sequence(host, cpu, seq, time_ns)
        self._emit(text)

    def hold(self) -> None:
        """Keep the next lines in memory until :meth:`release` (a burst in one ``write(2)``).

        The subscriber holds while more messages wait in its queue, and releases when the queue
        is empty, so under load a write carries many lines and at rest every line is written at
        once. Not with ``fsync``: each line is then written and synced on its own.
        """
        if not self._fsync:
            self._holding = True

    def release(self) -> None:
        """Write the held lines now (one ``write(2)``), and stop holding."""
        self._holding = False
        if not self._held:
            return
        data = b"".join(self._held)
        count = len(self._held)
        self._held = []
        self._held_bytes = 0
        try:
            self._writer_file().append(data)
            self.lines_written += count
        except OSError as error:
            self._unwritten += count
            self._last_error = repr(error)
            _log.error("audit_write_failed", error=repr(error), lines_lost=self._unwritten)

    def note(self, kind: str, fields: list[fmt.Field]) -> None:
        """Write a line of the writer's own (``STREAM``, ``AUDIT``) stamped with the current time.

        Args:
            kind: the line type.
            fields: ``(key, value)`` pairs.
        """
        self._emit(self._now_line(kind, fields))

    def disruption(self, reason: str, kind: str, fields: list[fmt.Field]) -> None:
        """Note an outage of the event stream: write a line and name later gaps after it.

        Args:
            reason: short token used as the ``reason`` of gaps spanning this outage.
            kind: the line type.
            fields: ``(key, value)`` pairs for the line.
        """
        self._tracker.disruption(reason)
        self.note(kind, fields)

    def maybe_rotate(self) -> None:
        """Rotate now if the current file is too old (called periodically while idle)."""
        self.release()
        file = self._writer_file()
        reason = file.rotation_due()
        if reason is not None:
            self._rotate(file, reason)

    def close(self) -> None:
        """Write a ``stopped`` line and close the file (idempotent)."""
        if self._file is None:
            return
        self.release()
        self._emit(self._now_line("AUDIT", [("event", "stopped")]))
        self._file.close()
        self._file = None

    def __enter__(self) -> AuditWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _writer_file(self) -> SecureRotatingFile:
        if self._file is None:
            raise RuntimeError("audit writer is closed")
        return self._file

    def _now_line(self, kind: str, fields: list[fmt.Field]) -> str:
        return fmt.line(int(self._clock() * 1e9), kind, fields)

    def _file_note(self, event: str, fields: dict[str, object]) -> None:
        self._pending_notes.append(self._now_line("AUDIT", [("event", event), *fields.items()]))

    def _sequence(self, host: str, cpu: int, seq: int, time_ns: int) -> None:
        found = self._tracker.observe(host, cpu, seq)
        if isinstance(found, Gap):
            self.gaps_missing += found.missing
            _log.warning("audit_gap", host=host, cpu=cpu, missing=found.missing, reason=found.reason)
            self._emit(
                fmt.line(
                    time_ns,
                    "GAP",
                    [
                        ("missing", found.missing),
                        ("host", host),
                        ("cpu", cpu),
                        ("seq", f"{found.first}..{found.last}"),
                        ("reason", found.reason),
                    ],
                )
            )
        elif isinstance(found, Reset):
            self._emit(
                fmt.line(
                    time_ns,
                    "SEQRESET",
                    [("host", host), ("cpu", cpu), ("previous", found.previous), ("seq", found.seq)],
                )
            )

    def _rotate(self, file: SecureRotatingFile, reason: str) -> None:
        previous = file.rotate(reason)
        self._pending_notes.append(
            self._now_line("AUDIT", [("event", "rotated"), ("reason", reason), ("previous", previous)])
        )

    def _emit(self, text: str) -> None:
        """Write one line; notes and the account of failed writes go first."""
        file = self._writer_file()
        data = text.encode("utf-8", "backslashreplace")
        if self._holding and not self._pending_notes and not self._unwritten:
            held = self._held_bytes + len(data)
            if held <= HOLD_MAX_BYTES and file.rotation_due(held) is None:
                self._held.append(data)
                self._held_bytes = held
                return
        if self._held:  # they go before this line, into the file they fit in
            holding = self._holding
            self.release()
            self._holding = holding
        try:
            queued = sum(len(note) for note in self._pending_notes)
            reason = file.rotation_due(len(data) + queued)
            if reason is not None:
                self._rotate(file, reason)
            lines = self._pending_notes
            if self._unwritten:
                lines = [
                    *lines,
                    self._now_line(
                        "AUDIT",
                        [
                            ("event", "write_failed"),
                            ("lines_lost", self._unwritten),
                            ("error", self._last_error),
                        ],
                    ),
                ]
            for pending in lines:
                file.append(pending.encode("utf-8", "backslashreplace"))
            self._pending_notes = []
            self._unwritten = 0
            file.append(data)
            if self._fsync:
                file.fsync()
            self.lines_written += 1
        except OSError as error:
            self._unwritten += 1
            self._last_error = repr(error)
            _log.error("audit_write_failed", error=repr(error), lines_lost=self._unwritten)


class AuditSubscriber:
    """Feeds an :class:`AuditWriter` from NATS and records the stream's outages in it.

    Args:
        nc: a connected nats-py client (reconnecting is nats-py's job).
        writer: where the lines go.
        subject: what to consume.
        connection_events: the callback set ``nc`` was connected with; without it
            disconnections cannot be recorded.
        pending_msgs_limit: messages nats-py buffers for this subscription before it drops
            (a slow consumer, recorded in the log).
    """

    def __init__(
        self,
        nc: NATS,
        writer: AuditWriter,
        subject: str = DEFAULT_SUBJECT,
        *,
        connection_events: NatsConnectionEvents | None = None,
        pending_msgs_limit: int = 65536,
    ) -> None:
        self._nc = nc
        self._writer = writer
        self._subject = subject
        self._events = connection_events
        self._pending_msgs_limit = pending_msgs_limit
        self._sub: Subscription | None = None
        self._down_since: float | None = None

    async def start(self) -> None:
        """Subscribe and start listening to the connection's callbacks."""
        if self._events is not None:
            self._events.add_listener(self)
        self._sub = await self._nc.subscribe(
            self._subject, cb=self._on_msg, pending_msgs_limit=self._pending_msgs_limit
        )
        await confirm_subscriptions(self._nc)
        self._writer.note("STREAM", [("event", "subscribed"), ("subject", self._subject), *self._server()])

    def pending(self) -> int:
        """Messages delivered to this subscription and not handled yet."""
        return self._sub.pending_msgs if self._sub is not None else 0

    async def stop(self) -> None:
        """Unsubscribe (when still connected) and stop listening."""
        if self._events is not None:
            self._events.remove_listener(self)
        if self._sub is not None and self._nc.is_connected:
            await self._sub.unsubscribe()
        self._sub = None

    def _server(self) -> list[fmt.Field]:
        url = self._nc.connected_url
        if url is None:
            return [("server", None)]
        # Never write credentials into the log: scheme://host:port only.
        return [("server", f"{url.scheme}://{url.hostname}:{url.port}")]

    async def _on_msg(self, msg: Msg) -> None:
        self._writer.hold()
        try:
            self._handle(msg)
        finally:
            sub = self._sub
            if sub is None or sub.pending_msgs == 0:
                self._writer.release()

    def _handle(self, msg: Msg) -> None:
        if ".connection." in msg.subject:
            try:
                self._writer.write_connection(msg.data)
                return
            except msgspec.DecodeError:
                pass  # said below, with the generic decoder's error
        try:
            event = decoder.decode(msg.data)
        except msgspec.DecodeError as error:
            self._writer.note(
                "AUDIT",
                [
                    ("event", "undecodable"),
                    ("subject", msg.subject),
                    ("bytes", len(msg.data)),
                    ("error", str(error)),
                ],
            )
            return
        self._writer.write(event)

    # -- ConnectionListener ------------------------------------------------------------------

    def on_disconnected(self) -> None:
        """Record that events published from now on may be missing."""
        if self._down_since is not None:
            return
        self._down_since = time.time()
        stamp = fmt.rfc3339_ms(int(self._down_since * 1e9))
        self._writer.disruption(
            "nats-disconnected",
            "STREAM",
            [
                ("event", "disconnected"),
                (
                    "msg",
                    f"audit: event stream disconnected at {stamp}, events published meanwhile may be missing",
                ),
            ],
        )

    def on_reconnected(self) -> None:
        """Record that the stream is back and since when it was down."""
        since = self._down_since
        self._down_since = None
        down = fmt.rfc3339_ms(int(since * 1e9)) if since is not None else None
        self._writer.note(
            "STREAM",
            [
                ("event", "reconnected"),
                *self._server(),
                ("down_since", down),
                ("down_s", f"{time.time() - since:.3f}" if since is not None else None),
                ("msg", "audit: event stream reconnected; gaps in seq below show what was missed"),
            ],
        )

    def on_error(self, error: Exception) -> None:
        """Record messages dropped by nats-py because this consumer was too slow."""
        if isinstance(error, SlowConsumerError) and error.sub is self._sub:
            self._writer.disruption(
                "slow-consumer",
                "STREAM",
                [("event", "slow_consumer"), ("subject", error.subject), ("msg", "audit: messages dropped")],
            )

    def on_closed(self) -> None:
        """Record that the connection is closed for good."""
        self._writer.disruption("nats-closed", "STREAM", [("event", "closed")])


async def run_audit(
    nc: NATS,
    path: Path,
    *,
    subject: str = DEFAULT_SUBJECT,
    connection_events: NatsConnectionEvents | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_age_s: float = DEFAULT_MAX_AGE_S,
    keep: int = DEFAULT_KEEP,
    process_events: bool = False,
    fsync: bool = False,
    task_status: TaskStatus[AuditWriter] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The audit stage: write the log until cancelled.

    Args:
        nc: connected nats-py client.
        path: the log file.
        subject: what to consume.
        connection_events: the callback set ``nc`` was connected with (for STREAM lines).
        max_bytes: see :class:`AuditWriter`.
        max_age_s: see :class:`AuditWriter`.
        keep: see :class:`AuditWriter`.
        process_events: see :class:`AuditWriter`.
        fsync: see :class:`AuditWriter`.
        task_status: receives the writer once subscribed.
    """
    writer = AuditWriter(
        path, max_bytes=max_bytes, max_age_s=max_age_s, keep=keep, process_events=process_events, fsync=fsync
    )
    subscriber = AuditSubscriber(nc, writer, subject, connection_events=connection_events)
    try:
        await subscriber.start()
        task_status.started(writer)
        tick = min(60.0, max_age_s / 10)
        while True:
            await anyio.sleep(tick)
            writer.maybe_rotate()
    finally:
        with anyio.CancelScope(shield=True):
            await subscriber.stop()
        writer.close()
