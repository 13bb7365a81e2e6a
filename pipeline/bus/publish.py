"""Publish events from the pipeline onto NATS: encode once, batch flushes, never lose one silently.

Each event is encoded once with msgspec and sent with a core NATS publish on
:func:`pipeline.events.subject_for`; the JetStream stream (:mod:`pipeline.bus.stream`)
captures it. Publishes are grouped in batches, sent back to back, and confirmed together once
``window`` batches wait or no event does. With ``stream_ack`` (the agent's default while it keeps
an event stream) the last event before a confirmation carries a reply subject, and JetStream's
answer, sent once it has stored that event, confirms every event before it on the connection as
stored, since the stream stores one connection's messages in order; without, a flush round trip
(PING/PONG) confirms that the server received them. If a publish or a confirmation fails
(connection lost, timeout), or the client reconnected in between, every unconfirmed batch is
sent again, in order, with backoff until the server confirms it, so an event is never lost
silently; it may be stored twice after a reconnect unless ``msg_id_header`` is on (the stream
then drops the duplicate).
"""

from __future__ import annotations

import contextlib
import math
import time

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec
import nats.errors
import nats.js.errors
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from pipeline.bus.barrier import server_barrier
from pipeline.events import Event, subject_for
from pipeline.hotpath import Encoded, event_id

log = structlog.get_logger(__name__)

DEFAULT_MAX_BATCH = 1024
DEFAULT_WINDOW = 8
CRLF = b"\r\n"  # batches sent but not yet confirmed
DEFAULT_FLUSH_TIMEOUT_S = 5
DEFAULT_BACKOFF_S = (0.05, 5.0)
STREAM_RECHECK_S = 30.0


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
        events: MemoryObjectReceiveStream[Event | list[Event] | Encoded],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        window: int = DEFAULT_WINDOW,
        flush_timeout_s: int = DEFAULT_FLUSH_TIMEOUT_S,
        backoff_s: tuple[float, float] = DEFAULT_BACKOFF_S,
        msg_id_header: bool = False,
        stream_ack: str | None = None,
    ) -> None:
        """Create the stage.

        Args:
            nc: Connected NATS client with the agent's credentials. Connect it with
                ``max_reconnect_attempts=-1`` so it keeps reconnecting.
            events: Bounded receive half of the pipeline's event stream; the stage
                finishes when its send halves are closed and everything is confirmed.
            max_batch: Events in one batch (a pre-encoded batch is never split, so one may exceed it).
            window: Most batches sent and not yet confirmed; the stage stops taking events
                while that many wait.
            flush_timeout_s: How long to wait for the server to confirm a batch.
            backoff_s: First and largest delay between attempts to send a failed batch.
            msg_id_header: Send each event with a ``Nats-Msg-Id: <event id>`` header so
                the stream stores a re-sent event once (about 30% slower).
            stream_ack: The name of the JetStream stream that keeps the events: confirm them
                only once it has stored them (see the module's docstring). Where it does not
                exist (deleted, or a server without JetStream) this is logged once, the round
                trip confirms, and the stream is looked for again every ``STREAM_RECHECK_S``.
        """
        if max_batch < 1 or window < 1:
            raise ValueError("max_batch and window must be at least 1")
        self._window = window
        self._nc = nc
        self._events = events
        self._max_batch = max_batch
        self._flush_timeout_s = flush_timeout_s
        self._backoff_s = backoff_s
        self._msg_id_header = msg_id_header
        self._stream_ack = stream_ack
        self._ack_prefix = b""  # the inbox JetStream answers on, subscribed on first use
        self._acks: dict[bytes, _StreamAck] = {}
        self._ack_count = 0
        self._no_stream_logged = False
        self._acks_paused_until = 0.0  # no stream found: round trips only until then
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

        Batches are sent back to back; one round trip confirms all that were sent on the same
        connection before it, either when ``window`` batches are unconfirmed or when no event
        is waiting. One task does both, so batches go out in order, also when sent again.

        Args:
            task_status: Signalled as started once the stage is ready to receive.

        Raises:
            PublisherClosedError: The NATS connection was closed for good.
        """
        task_status.started()
        inflight: list[_Frames] = []
        async with self._events:
            ended = False
            while not ended:
                try:
                    first = await self._events.receive()
                except anyio.EndOfStream:
                    break
                # Stages send one event, a list of events, or events already encoded; an Encoded
                # sent here is the publisher's from then on, and a batch may start as it is.
                if isinstance(first, Encoded):
                    batch = first
                else:
                    batch = Encoded()
                    self._add(batch, first)
                idle = False
                while len(batch) < self._max_batch:
                    try:
                        self._add(batch, self._events.receive_nowait())
                    except anyio.WouldBlock:
                        if idle:
                            break
                        # Let producers run once: while events keep coming the batch grows.
                        idle = True
                        await anyio.lowlevel.checkpoint()
                        continue
                    except anyio.EndOfStream:
                        ended = True
                        break
                    idle = False
                self._received += len(batch)
                confirm = len(inflight) + 1 >= self._window or idle or ended
                frames = self._frame(batch)
                if confirm and self._stream_ack and time.monotonic() >= self._acks_paused_until:
                    await self._ask_for_ack(frames)
                inflight.append(frames)
                with contextlib.suppress(nats.errors.Error, OSError):
                    await self._send(frames)  # a batch that could not be sent is sent again by _confirm
                if confirm:
                    await self._confirm(inflight)
            if inflight:
                await self._confirm(inflight)
        log.info("publisher_finished", confirmed=self._confirmed)

    def _add(self, batch: Encoded, item: Event | list[Event] | Encoded) -> None:
        if isinstance(item, Encoded):
            batch.extend(item)
            return
        encode = self._encode
        for event in item if isinstance(item, list) else (item,):
            batch.add(subject_for(event).encode(), encode(event))

    def _frame(self, batch: Encoded) -> _Frames:
        """The batch as NATS protocol: one PUB (or HPUB with a message id) per event.

        The events come as PUB commands already; they are sent as they are unless a message id
        header is wanted, or one of them may be over the server's max payload (one of the pieces
        that make the commands is; the exact test is then made on each payload).
        """
        pieces = batch.pieces
        max_payload = self._nc.max_payload or math.inf
        if not self._msg_id_header and (not pieces or max(map(len, pieces)) <= max_payload):
            return _joined(batch)
        return self._frame_each(batch, max_payload)

    def _frame_each(self, batch: Encoded, max_payload: float) -> _Frames:
        """:meth:`_frame`, event by event: HPUB with message ids, and events too large to send.

        An event larger than the server's max payload can never be sent: it is counted and
        logged with its id, and left out.
        """
        pieces: list[bytes] = []  # joined once: no copy of a payload into a frame of its own
        extend = pieces.extend
        events = sizes = 0
        for subject, payload in batch.events():
            size = len(payload)
            if size > max_payload:
                self._undeliverable += 1
                log.error("event_undeliverable", event_id=event_id(payload), size=size, max_payload=max_payload)
                continue
            if self._msg_id_header:
                header = b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" % event_id(payload).encode()
                extend((b"HPUB %s %d %d\r\n" % (subject, len(header), len(header) + size), header, payload, CRLF))
            else:
                extend((b"PUB %s %d\r\n" % (subject, size), payload, CRLF))
            events += 1
            sizes += size
        return _Frames(b"".join(pieces), events, sizes)

    async def _confirm(self, inflight: list[_Frames]) -> None:
        """Return once the server has confirmed every batch in ``inflight`` (then emptied).

        A round trip confirms a batch only if the connection it was sent on is still the
        current one when the answer comes: nats-py's flush returns at once while it is
        reconnecting, and what was written to a dead connection is gone. Otherwise every batch
        of ``inflight`` is sent again, in order, before the next round trip.
        """
        nc = self._nc
        events = sum(b.events for b in inflight)
        attempt = 0
        while True:
            try:
                generation = nc.stats["reconnects"]
                if not nc.is_connected:
                    raise nats.errors.ConnectionReconnectingError
                if any(b.generation != generation for b in inflight):
                    if inflight[-1].ack is not None:
                        # A new reply subject: an answer to the earlier copy says nothing about
                        # the batches sent again before this one.
                        await self._ask_for_ack(inflight[-1])
                    resent = 0
                    for b in inflight:  # all of them, to keep the order
                        await self._send(b)
                        resent += b.events
                    self._retried += resent
                ack = inflight[-1].ack
                if ack is None or not await self._stored(ack):
                    await server_barrier(nc, timeout=self._flush_timeout_s)
                if not nc.is_connected or nc.stats["reconnects"] != generation:
                    raise nats.errors.ConnectionReconnectingError
                break
            except (nats.errors.Error, OSError) as exc:
                for b in inflight:
                    b.generation = -1  # not known to have reached the server: send again
                attempt = await self._failed(exc, attempt, events)
        self._confirmed += events
        self._batches += len(inflight)
        if attempt:
            log.info("publish_recovered", attempts=attempt + 1, events=events)
        for b in inflight:
            if b.ack is not None:
                self._acks.pop(b.ack.token, None)
        inflight.clear()

    async def _ask_for_ack(self, frames: _Frames) -> None:
        """Give the batch's last event a new reply subject, where JetStream says it stored it.

        Without a subscription for the answers (the client could not make one), the batch is
        left as it is and the round trip confirms it.
        """
        if not frames.events:
            return
        if not self._ack_prefix:
            prefix = self._nc.new_inbox()
            try:
                await self._nc.subscribe(f"{prefix}.*", cb=self._on_ack)  # sent before any PUB using it
            except nats.errors.Error as exc:
                log.warning("stream_ack_unavailable", error=repr(exc))
                return
            self._ack_prefix = prefix.encode()
        if frames.ack is not None:
            self._acks.pop(frames.ack.token, None)  # a late answer to the earlier copy is ignored
        if frames.plain is None:
            frames.plain = frames.data
        data = frames.plain
        self._ack_count += 1
        token = b"%s.%d" % (self._ack_prefix, self._ack_count)
        start = frames.last if _is_last_command(data, frames.last) else _last_command(data)
        eol = data.index(CRLF, start)
        verb, subject, *sizes = data[start:eol].split(b" ")
        frames.data = data[:start] + b" ".join((verb, subject, token, *sizes)) + data[eol:]
        frames.ack = self._acks[token] = _StreamAck(token)

    async def _on_ack(self, msg: Msg) -> None:
        ack = self._acks.get(msg.subject.encode())
        if ack is None:
            return  # an answer for a window already confirmed (sent again meanwhile)
        if msg.headers and msg.headers.get("Status") == "503":
            ack.result = "no-stream"
        else:
            try:
                answer = msgspec.json.decode(msg.data)
            except msgspec.DecodeError:
                answer = {"error": {"description": f"not a JetStream answer: {msg.data[:100]!r}"}}
            error = answer.get("error") if isinstance(answer, dict) else None
            ack.result = "stored" if error is None else f"refused: {error.get('description', error)}"
        ack.done.set()

    async def _stored(self, ack: _StreamAck) -> bool:
        """Wait for JetStream's answer: True once stored; False where no stream takes the events.

        Raises:
            nats.errors.TimeoutError: no answer in time (the caller sends the window again).
        """
        with anyio.move_on_after(self._flush_timeout_s):
            await ack.done.wait()
        if not ack.done.is_set():
            # No answer: the stream is slow, or there is none and live subscribers took the
            # message (no "no responders" then). Only the latter stops asking.
            if await self._stream_exists():
                raise nats.errors.TimeoutError
            ack.result = "no-stream"
        if ack.result == "stored":
            if self._no_stream_logged:
                log.info("event_stream_storing_again")
                self._no_stream_logged = False
            return True
        if not self._no_stream_logged:
            # Live subscribers still get every event; only the catch-up store is missing.
            log.warning(
                "event_stream_not_storing",
                reason=ack.result,
                advice="events reach live subscribers but are not kept; restart the agent to recreate the stream",
            )
            self._no_stream_logged = True
        self._acks_paused_until = time.monotonic() + STREAM_RECHECK_S
        return False

    async def _stream_exists(self) -> bool:
        assert self._stream_ack is not None
        try:
            await self._nc.jetstream().stream_info(self._stream_ack)
        except nats.js.errors.NotFoundError:
            return False
        except nats.errors.NoRespondersError:  # a server without JetStream
            return False
        return True

    async def _failed(self, exc: BaseException, attempt: int, events: int) -> int:
        """Count and log a failed attempt, then back off; the next attempt's number."""
        if self._nc.is_closed:
            log.error("publish_connection_closed", pending=events, error=repr(exc))
            raise PublisherClosedError(f"NATS connection closed with {events} events not confirmed") from exc
        self._publish_failures += 1
        delay = min(self._backoff_s[0] * (2**attempt), self._backoff_s[1])
        log.warning("publish_failed", error=repr(exc), attempt=attempt + 1, events=events, retry_in_s=delay)
        await anyio.sleep(delay)  # backoff before sending again
        return attempt + 1

    async def _send(self, batch: _Frames) -> None:
        """Queue the batch's protocol bytes on the client, as its own publish() would.

        nats-py has no batch publish, and one ``publish()`` per event costs more than the rest
        of the pipeline. The client's command queue (``_send_command``, then ``_flush_pending``
        to wake its flusher) is what ``publish()`` itself uses after building one PUB; this does
        the same for many. Pinned to nats-py 2.x in pyproject.toml; tests/bus cover it against a
        real server. Nothing is queued while the client reconnects: the batch would wait in its
        reconnect buffer, and _confirm sends it again anyway once the connection is back.
        """
        nc = self._nc
        if nc.is_closed:
            raise nats.errors.ConnectionClosedError
        if nc.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        if not nc.is_connected:
            raise nats.errors.ConnectionReconnectingError
        batch.generation = nc.stats["reconnects"]
        nc.stats["out_msgs"] += batch.events
        nc.stats["out_bytes"] += batch.payload_bytes
        await nc._send_command(batch.data)
        if nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()


def _joined(batch: Encoded) -> _Frames:
    """The batch's commands as one bytes object, and a hint of where the last one starts.

    Every event is three pieces (hotpath.Encoded), so the last three give the hint; it is
    checked (:func:`_is_last_command`) before it is used.
    """
    pieces = batch.pieces
    data = b"".join(pieces)
    last = len(data) - sum(map(len, pieces[-3:])) if len(pieces) == 3 * batch.count else -1
    return _Frames(data, batch.count, batch.payload_bytes, last)


def _is_last_command(data: bytes, start: int) -> bool:
    """Whether a PUB/HPUB command starting at ``start`` ends exactly where ``data`` does."""
    if start < 0 or not (data.startswith(b"PUB ", start) or data.startswith(b"HPUB ", start)):
        return False
    eol = data.find(CRLF, start)
    try:
        size = int(data[data.rindex(b" ", start, eol) + 1 : eol])  # the total size is last
    except ValueError:  # also: no space before the end of the line
        return False
    return eol + 2 + size + 2 == len(data)


def _last_command(data: bytes) -> int:
    """Offset of the last PUB/HPUB command in ``data`` (commands back to back)."""
    pos = last = 0
    while pos < len(data):
        last = pos
        eol = data.index(CRLF, pos)
        pos = eol + 2 + int(data[data.rindex(b" ", pos, eol) + 1 : eol]) + 2  # the total size is last
    return last


class _StreamAck:
    """JetStream's answer for one window: ``stored``, ``no-stream`` or ``refused: ...``."""

    __slots__ = ("done", "result", "token")

    def __init__(self, token: bytes) -> None:
        self.token = token
        self.done = anyio.Event()
        self.result = ""


class _Frames:
    """One batch as NATS protocol, and the connection (reconnect count) it was last sent on."""

    __slots__ = ("ack", "data", "events", "generation", "last", "payload_bytes", "plain")

    def __init__(self, data: bytes, events: int, payload_bytes: int, last: int = -1) -> None:
        self.data = data  # PUB/HPUB commands, back to back
        self.events = events
        self.payload_bytes = payload_bytes
        self.last = last  # where the last command starts, if known (-1: found by parsing)
        self.generation = -1  # not sent yet
        self.ack: _StreamAck | None = None  # the last event asks JetStream to answer here
        self.plain: bytes | None = None  # ``data`` before a reply subject was put in
