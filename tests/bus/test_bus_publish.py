"""The publisher and the events stream: order, exact counts, catch-up and reconnects."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from pipeline.bus.barrier import server_barrier
from pipeline.bus.publish import Publisher
from pipeline.bus.server import EVENTS_STREAM, EmbeddedNats
from pipeline.bus.stream import ensure_stream, stream_config
from pipeline.events import ConnectionEvent, Event, decoder, subject_for
from pipeline.hotpath import Encoded

from .bus_testkit import connection_event, events

pytestmark = pytest.mark.anyio


async def _publish_all(nc: NATS, batch: list[Event], **options: object) -> Publisher:
    # As the agent runs with a stream: confirmed means stored, so tests may read the stream at once.
    options.setdefault("stream_ack", EVENTS_STREAM)
    send, receive = anyio.create_memory_object_stream[Event](64)
    publisher = Publisher(nc, receive, **options)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(publisher.run)
        async with send:
            for event in batch:
                await send.send(event)
    return publisher


async def _stream_messages(nc: NATS) -> int:
    info = await nc.jetstream().stream_info(EVENTS_STREAM)
    return info.state.messages


async def test_delivers_every_event_in_order_with_exact_counts(agent_nc: NATS, consumer_nc: NATS) -> None:
    """N events arrive once each, in order, on their subjects; counters say N."""
    n = 5000
    sub = await consumer_nc.subscribe("tool.events.>", pending_msgs_limit=n * 2)
    await server_barrier(consumer_nc)
    batch = events(n)
    publisher = await _publish_all(agent_nc, batch)

    counters = publisher.counters()
    assert counters.received == n
    assert counters.confirmed == n
    assert counters.publish_failures == 0
    assert counters.undeliverable == 0
    received: list[ConnectionEvent] = []
    with anyio.fail_after(10):
        for _ in range(n):
            msg = await sub.next_msg(timeout=10)
            event = decoder.decode(msg.data)
            assert isinstance(event, ConnectionEvent)
            assert msg.subject == subject_for(event)
            received.append(event)
    assert [e.seq for e in received] == list(range(1, n + 1))
    assert received == batch
    assert await _stream_messages(agent_nc) == n


async def test_encoded_batches_and_events_interleave_in_order_with_a_small_window(
    agent_nc: NATS, consumer_nc: NATS
) -> None:
    """Pre-encoded batches (the pipeline's hot path) and single events keep their order, and a
    window of 2 unconfirmed batches still confirms every event exactly once."""
    n = 3000
    sub = await consumer_nc.subscribe("tool.events.>", pending_msgs_limit=n * 2)
    await server_barrier(consumer_nc)
    batch = events(n)
    send, receive = anyio.create_memory_object_stream[Event | Encoded](4)
    publisher = Publisher(agent_nc, receive, max_batch=100, window=2)
    async with anyio.create_task_group() as tg:
        await tg.start(publisher.run)
        async with send:
            for start in range(0, n, 250):
                if start % 500:
                    for event in batch[start : start + 250]:
                        await send.send(event)
                else:
                    encoded = Encoded()
                    for event in batch[start : start + 250]:
                        encoded.add(subject_for(event).encode(), msgspec.json.encode(event))
                    await send.send(encoded)
    counters = publisher.counters()
    assert (counters.received, counters.confirmed, counters.publish_failures) == (n, n, 0)
    with anyio.fail_after(10):
        received = [decoder.decode((await sub.next_msg(timeout=10)).data) for _ in range(n)]
    assert received == batch
    assert await _stream_messages(agent_nc) == n


async def test_an_event_over_the_max_payload_is_counted_and_the_rest_arrive_in_order(
    agent_nc: NATS, consumer_nc: NATS
) -> None:
    """An event the server can never take (over its 1 MB max payload), pre-encoded or not, is
    counted as undeliverable and left out; every other event of its batch arrives, in order."""
    batch = events(40)
    huge = msgspec.structs.replace(batch[7], id="ev-huge", host="h" * (agent_nc.max_payload + 1))  # type: ignore[type-var]
    sub = await consumer_nc.subscribe("tool.events.>", pending_msgs_limit=100)
    await server_barrier(consumer_nc)
    send, receive = anyio.create_memory_object_stream[Event | Encoded](4)
    publisher = Publisher(agent_nc, receive)
    async with anyio.create_task_group() as tg:
        await tg.start(publisher.run)
        async with send:
            encoded = Encoded()
            for event in [*batch[:20], huge]:
                encoded.add(subject_for(event).encode(), msgspec.json.encode(event))
            await send.send(encoded)
            for event in [*batch[20:], huge]:
                await send.send(event)
    counters = publisher.counters()
    assert (counters.received, counters.confirmed, counters.undeliverable) == (42, 40, 2)
    with anyio.fail_after(10):
        received = [decoder.decode((await sub.next_msg(timeout=10)).data) for _ in range(40)]
    assert received == batch
    assert await _stream_messages(agent_nc) == 40


async def test_late_consumer_catches_up_from_the_stream(agent_nc: NATS, consumer_nc: NATS) -> None:
    """A consumer that subscribes after the events were published still gets all of them."""
    n = 200
    await _publish_all(agent_nc, events(n))
    js = consumer_nc.jetstream()
    psub = await js.pull_subscribe(
        "tool.events.>",
        stream=EVENTS_STREAM,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT),
    )
    seqs: list[int] = []
    with anyio.fail_after(10):
        while len(seqs) < n:
            for msg in await psub.fetch(100, timeout=5):
                event = decoder.decode(msg.data)
                assert isinstance(event, ConnectionEvent)
                seqs.append(event.seq)
                await msg.ack()
    assert seqs == list(range(1, n + 1))


async def test_durable_consumer_resumes_where_it_stopped(agent_nc: NATS, consumer_nc: NATS) -> None:
    """A durable consumer that was away gets exactly the events it missed."""
    js = consumer_nc.jetstream()
    config = ConsumerConfig(durable_name="audit", ack_policy=AckPolicy.EXPLICIT)
    psub = await js.pull_subscribe("tool.events.>", durable="audit", stream=EVENTS_STREAM, config=config)
    await _publish_all(agent_nc, events(10))
    first: list[Msg] = []
    with anyio.fail_after(10):
        while len(first) < 10:  # a fetch returns what the stream holds yet (confirmed != stored)
            first += await psub.fetch(10 - len(first), timeout=5)
    for msg in first:
        await msg.ack_sync()
    await psub.unsubscribe()

    await _publish_all(agent_nc, [connection_event(seq=s) for s in range(11, 16)])
    again = await js.pull_subscribe("tool.events.>", durable="audit", stream=EVENTS_STREAM)
    missed: list[Msg] = []
    with anyio.fail_after(10):
        while len(missed) < 5:
            missed += await again.fetch(5 - len(missed), timeout=5)
    seqs = [msgspec.json.decode(m.data)["seq"] for m in missed]
    assert seqs == [11, 12, 13, 14, 15]


async def test_ensure_stream_is_idempotent_and_updates(agent_nc: NATS) -> None:
    """Calling ensure_stream again with new limits updates the existing stream."""
    js = agent_nc.jetstream()
    info = await ensure_stream(js, stream_config(max_age_s=3600, max_bytes=1 << 20))
    assert info.config.max_age == 3600
    assert info.config.max_bytes == 1 << 20
    assert info.config.subjects == ["tool.events.>"]


async def test_nothing_lost_across_a_server_restart(tmp_path: Path) -> None:
    """Events sent while the server is down are retried and stored exactly once (msg id dedupe),
    and every event confirmed before the stop is in the stream after it."""
    state = tmp_path / "state"
    server = EmbeddedNats(state, port=0)
    await server.start()
    port = int(server.url.rsplit(":", 1)[1])
    disconnected = anyio.Event()
    reconnected = anyio.Event()

    async def on_disconnect() -> None:
        disconnected.set()

    async def on_reconnect() -> None:
        reconnected.set()

    nc = await nats.connect(
        server.credentials["agent"].url_with_auth(),
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )
    try:
        await ensure_stream(nc.jetstream())
        send, receive = anyio.create_memory_object_stream[Event](16)
        publisher = Publisher(
            nc, receive, msg_id_header=True, flush_timeout_s=1, backoff_s=(0.05, 0.5), stream_ack=EVENTS_STREAM
        )
        n_before, n_during, n_after = 100, 50, 100
        batch = events(n_before + n_during + n_after)
        async with anyio.create_task_group() as tg:
            await tg.start(publisher.run)
            async with send:
                for event in batch[:n_before]:
                    await send.send(event)
                with anyio.fail_after(10):
                    while publisher.counters().confirmed < n_before:
                        await anyio.sleep(0.01)  # condition polled with a deadline
                await server.stop()  # at once: confirmed means stored (stream acknowledgements)
                with anyio.fail_after(10):
                    await disconnected.wait()
                for event in batch[n_before : n_before + n_during]:
                    await send.send(event)
                server = EmbeddedNats(state, port=port)
                await server.start()
                with anyio.fail_after(20):
                    await reconnected.wait()
                for event in batch[n_before + n_during :]:
                    await send.send(event)
        counters = publisher.counters()
        assert counters.confirmed == len(batch)
        js = nc.jetstream()
        assert (await js.stream_info(EVENTS_STREAM)).state.messages == len(batch)
        psub = await js.pull_subscribe("tool.events.>", stream=EVENTS_STREAM)
        seqs: list[int] = []
        with anyio.fail_after(10):
            while len(seqs) < len(batch):
                for msg in await psub.fetch(100, timeout=5):
                    seqs.append(msgspec.json.decode(msg.data)["seq"])
                    await msg.ack()
        assert seqs == list(range(1, len(batch) + 1))
    finally:
        await nc.close()
        await server.stop()


async def test_publish_rate(agent_nc: NATS) -> None:
    """Measures throughput to a local server (printed; benchmarks/bench_publish.py is the benchmark)."""
    n = 20_000
    batch = events(n)
    started = time.perf_counter()
    publisher = await _publish_all(agent_nc, batch)
    elapsed = time.perf_counter() - started
    assert publisher.counters().confirmed == n
    print(f"published {n} events in {elapsed:.3f}s: {n / elapsed:,.0f} events/s")


@pytest.mark.parametrize("msg_id_header", [False, True])
async def test_with_stream_acks_confirmed_means_stored_even_if_the_server_stops_at_once(
    tmp_path: Path, msg_id_header: bool
) -> None:
    """The server is stopped the moment the publisher has confirmed: every confirmed event is in
    the stream after a restart (without stream acks a graceful stop could drop the tail)."""
    state = tmp_path / "state"
    server = EmbeddedNats(state, port=0)
    await server.start()
    nc = await nats.connect(server.credentials["agent"].url_with_auth(), allow_reconnect=False)
    n = 3000
    try:
        await ensure_stream(nc.jetstream())
        publisher = await _publish_all(nc, events(n), stream_ack=EVENTS_STREAM, msg_id_header=msg_id_header)
        assert publisher.counters().confirmed == n
    finally:
        await nc.close()
        await server.stop()  # at once: no waiting for the stream to catch up
    server = EmbeddedNats(state, port=0)
    await server.start()
    try:
        nc = await nats.connect(server.credentials["agent"].url_with_auth())
        assert await _stream_messages(nc) == n
        await nc.close()
    finally:
        await server.stop()


async def test_without_a_stream_the_publisher_says_so_and_still_delivers(
    agent_nc: NATS, consumer_nc: NATS, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stream acks asked for, but nothing stores the events: live delivery goes on, logged once."""
    await agent_nc.jetstream().delete_stream(EVENTS_STREAM)
    n = 300
    sub = await consumer_nc.subscribe("tool.events.>", pending_msgs_limit=n * 2)
    await server_barrier(consumer_nc)
    publisher = await _publish_all(
        agent_nc, events(n), stream_ack=EVENTS_STREAM, max_batch=50, window=2, flush_timeout_s=1
    )
    assert publisher.counters().confirmed == n
    with anyio.fail_after(10):
        for _ in range(n):
            await sub.next_msg(timeout=10)
    assert capsys.readouterr().out.count("event_stream_not_storing") == 1


def test_the_last_command_is_found_past_headers_and_payloads() -> None:
    from pipeline.bus.publish import _last_command

    first = b"PUB a.b 3\r\nPUB\r\n"
    second = b"HPUB c.d 12 15\r\nNATS/1.0\r\n\r\nx y\r\n"
    third = b"PUB e 0\r\n\r\n"
    assert _last_command(first + second) == len(first)
    assert _last_command(first + second + third) == len(first + second)
    assert _last_command(first) == 0


def test_a_hint_of_the_last_command_is_used_only_when_it_parses_to_the_end() -> None:
    from pipeline.bus.publish import _is_last_command

    first = b"PUB a.b 9\r\nPUB x 1\r\n\r\n"  # a payload that looks like a command
    last = b"PUB c.d 2\r\nok\r\n"
    data = first + last
    assert _is_last_command(data, len(first))
    assert not _is_last_command(data, 0)  # a command, but not the last
    assert not _is_last_command(data, first.index(b"PUB x"))  # inside a payload
    assert not _is_last_command(data, -1)  # no hint
    assert not _is_last_command(data, len(first) + 1)
    assert not _is_last_command(b"PUB c.d x\r\nok\r\n", 0)  # not a size
    assert _is_last_command(b"HPUB c.d 12 15\r\nNATS/1.0\r\n\r\nx y\r\n", 0)
