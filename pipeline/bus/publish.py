"""Publish events from the pipeline onto NATS: encode once, batch flushes, never lose one silently.

Each event is encoded once with msgspec and sent with a core NATS publish on
:func:`pipeline.events.subject_for`; the JetStream stream (:mod:`pipeline.bus.stream`)
captures it. Publishes are grouped in batches that end with a flush round trip (PING/PONG):
when it returns the server has received every event of the batch. If a publish or the flush
fails (connection lost, reconnect buffer full, timeout) the whole batch is sent again with
backoff until the server confirms it, so an event is never lost silently; it may be stored
twice after a reconnect unless ``msg_id_header`` is on (the stream then drops the duplicate).
"""

from __future__ import annotations

import math

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec
import nats.errors
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream
from nats.aio.client import Client as NATS

from pipeline.bus.barrier import server_barrier
from pipeline.events import Event, subject_for

log = structlog.get_logger(__name__)

DEFAULT_MAX_BATCH = 1024
DEFAULT_FLUSH_TIMEOUT_S = 5
DEFAULT_BACKOFF_S = (0.05, 5.0)


class PublisherClosedError(Exception):
    """The NATS connection was closed for good while events were still to be published."""


class PublisherCounters(msgspec.Struct, frozen=True):
    """A snapshot of the publisher's counters (totals since it was created).

    Attributes:
        received: Events taken from the input stream.
        confirmed: Events the server confirmed it received (flush round trip returned).
        batches: Batches confirmed.
        publish_failures: Failed attempts to send or confirm a batch (each is logged).
        retried: Events sent again after a failed attempt.
        undeliverable: Events that can never be sent (larger than the server's max payload);
            each is logged with its id.
    """

    received: int = 0
    confirmed: int = 0
    batches: int = 0
    publish_failures: int = 0
    retried: int = 0
    undeliverable: int = 0


class Publisher:
    """Pipeline stage that publishes every event it receives, in order.

    Back-pressure: while a batch is not confirmed, no further event is taken from the
    input stream, so producers block on their bounded send stream instead of events being
    dropped.
    """

    def __init__(
        self,
        nc: NATS,
        events: MemoryObjectReceiveStream[Event | list[Event]],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        flush_timeout_s: int = DEFAULT_FLUSH_TIMEOUT_S,
        backoff_s: tuple[float, float] = DEFAULT_BACKOFF_S,
        msg_id_header: bool = False,
    ) -> None:
        """Create the stage.

        Args:
            nc: Connected NATS client with the agent's credentials. Connect it with
                ``max_reconnect_attempts=-1`` so it keeps reconnecting.
            events: Bounded receive half of the pipeline's event stream; the stage
                finishes when its send halves are closed and everything is confirmed.
            max_batch: Most events sent between two flush round trips.
            flush_timeout_s: How long to wait for the server to confirm a batch.
            backoff_s: First and largest delay between attempts to send a failed batch.
            msg_id_header: Send each event with a ``Nats-Msg-Id: <event id>`` header so
                the stream stores a re-sent event once (about 30% slower).
        """
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._nc = nc
        self._events = events
        self._max_batch = max_batch
        self._flush_timeout_s = flush_timeout_s
        self._backoff_s = backoff_s
        self._msg_id_header = msg_id_header
        self._encode = msgspec.json.Encoder().encode
        self._received = 0
        self._confirmed = 0
        self._batches = 0
        self._publish_failures = 0
        self._retried = 0
        self._undeliverable = 0

    def counters(self) -> PublisherCounters:
        """Return a snapshot of the counters, for metrics."""
        return PublisherCounters(
            received=self._received,
            confirmed=self._confirmed,
            batches=self._batches,
            publish_failures=self._publish_failures,
            retried=self._retried,
            undeliverable=self._undeliverable,
        )

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Publish until the input stream ends, then return once everything is confirmed.

        Args:
            task_status: Signalled as started once the stage is ready to receive.

        Raises:
            PublisherClosedError: The NATS connection was closed for good.
        """
        task_status.started()
        async with self._events:
            ended = False
            while not ended:
                try:
                    first = await self._events.receive()
                except anyio.EndOfStream:
                    break
                # Stages may send one event or a list of events (cheaper per event).
                batch = list(first) if isinstance(first, list) else [first]
                idle = False
                while len(batch) < self._max_batch:
                    try:
                        item = self._events.receive_nowait()
                        if isinstance(item, list):
                            batch.extend(item)
                        else:
                            batch.append(item)
                    except anyio.WouldBlock:
                        if idle:
                            break
                        # Let producers run once: while events keep coming the batch grows,
                        # so a busy pipeline pays one flush round trip per max_batch events.
                        idle = True
                        await anyio.lowlevel.checkpoint()
                        continue
                    except anyio.EndOfStream:
                        ended = True
                        break
                    idle = False
                self._received += len(batch)
                await self._deliver(self._encode_batch(batch))
        log.info("publisher_finished", confirmed=self._confirmed)

    def _encode_batch(self, batch: list[Event]) -> list[tuple[str, bytes, str]]:
        encoded: list[tuple[str, bytes, str]] = []
        append = encoded.append
        encode = self._encode
        max_payload = self._nc.max_payload or math.inf
        for event in batch:
            payload = encode(event)
            if len(payload) > max_payload:
                self._undeliverable += 1
                log.error(
                    "event_undeliverable",
                    event_id=event.id,
                    size=len(payload),
                    max_payload=max_payload,
                )
                continue
            append((subject_for(event), payload, event.id))  # cached per (host, direction, verdict)
        return encoded

    async def _deliver(self, batch: list[tuple[str, bytes, str]]) -> None:
        """Send one batch and wait for the server to confirm it, retrying until it does."""
        attempt = 0
        while True:
            try:
                await self._send(batch)
                await server_barrier(self._nc, timeout=self._flush_timeout_s)
            except (nats.errors.Error, OSError) as exc:
                if self._nc.is_closed:
                    log.error("publish_connection_closed", pending=len(batch), error=repr(exc))
                    raise PublisherClosedError(
                        f"NATS connection closed with {len(batch)} events not confirmed"
                    ) from exc
                self._publish_failures += 1
                delay = min(self._backoff_s[0] * (2**attempt), self._backoff_s[1])
                log.warning(
                    "publish_failed",
                    error=repr(exc),
                    attempt=attempt + 1,
                    events=len(batch),
                    retry_in_s=delay,
                )
                attempt += 1
                await anyio.sleep(delay)  # backoff before sending the batch again
                self._retried += len(batch)
                continue
            self._confirmed += len(batch)
            self._batches += 1
            if attempt:
                log.info("publish_recovered", attempts=attempt + 1, events=len(batch))
            return

    async def _send(self, batch: list[tuple[str, bytes, str]]) -> None:
        publish = self._nc.publish
        if self._msg_id_header:
            for subject, payload, event_id in batch:
                await publish(subject, payload, headers={"Nats-Msg-Id": event_id})
        else:
            for subject, payload, _ in batch:
                await publish(subject, payload)
