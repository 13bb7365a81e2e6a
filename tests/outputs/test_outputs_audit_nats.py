"""The audit log fed from a real nats-server, including a server restart in the middle."""

from __future__ import annotations

from pathlib import Path

import anyio
import nats
import pytest
from nats.aio.client import Client as NATS
from outputs_testkit import NatsServer, audit_lines, connection, loss, policy, wait_until

from pipeline.events import Event, encoder, subject_for
from pipeline.outputs.audit import AuditWriter, run_audit
from pipeline.outputs.nats_callbacks import NatsConnectionEvents

pytestmark = pytest.mark.anyio

RECONNECT = {"max_reconnect_attempts": -1, "reconnect_time_wait": 0.05, "allow_reconnect": True}


async def publish(nc: NATS, *events: Event) -> None:
    """Publish as the agent does: one JSON message per event on its subject."""
    for event in events:
        await nc.publish(subject_for(event), encoder.encode(event))
    await nc.flush()


def count(path: Path, needle: str) -> int:
    """How many lines of the audit file contain ``needle``."""
    return sum(needle in line for line in audit_lines(path))


async def test_events_published_on_nats_are_written(nats_server: NatsServer, tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.log"
    agent = await nats.connect(nats_server.url)
    consumer = await nats.connect(nats_server.url)
    try:
        async with anyio.create_task_group() as tg:
            writer = await tg.start(run_audit, consumer, path)
            assert isinstance(writer, AuditWriter)
            await publish(agent, connection(1), connection(2, verdict="blocked"), loss(), policy())
            await wait_until(lambda: count(path, " POLICY ") == 1)
            lines = audit_lines(path)
            assert [line.split(" seq=")[1].split()[0] for line in lines if " CONN " in line] == ["1", "2"]
            assert count(path, " LOSS lost=5 ") == 1
            assert count(path, "STREAM event=subscribed subject=tool.events.>") == 1
            tg.cancel_scope.cancel()
        assert audit_lines(path)[-1].endswith("AUDIT event=stopped")
    finally:
        await agent.close()
        await consumer.close()


async def test_undecodable_message_is_recorded_not_dropped(nats_server: NatsServer, tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.log"
    agent = await nats.connect(nats_server.url)
    consumer = await nats.connect(nats_server.url)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(run_audit, consumer, path)
            await agent.publish("tool.events.web1.connection.egress.allowed", b"{not json")
            await agent.flush()
            await wait_until(lambda: count(path, "event=undecodable") == 1)
            tg.cancel_scope.cancel()
    finally:
        await agent.close()
        await consumer.close()


async def test_survives_server_restart_and_names_the_gap(nats_server: NatsServer, tmp_path: Path) -> None:
    """Disconnect and reconnect lines are written and the gap across the outage is attributed to it."""
    path = tmp_path / "audit" / "audit.log"
    callbacks = NatsConnectionEvents()
    agent = await nats.connect(nats_server.url, **RECONNECT)
    consumer = await nats.connect(nats_server.url, **RECONNECT, **callbacks.connect_options())
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(
                lambda task_status: run_audit(consumer, path, connection_events=callbacks, task_status=task_status)
            )
            await publish(agent, connection(1), connection(2), connection(3))
            await wait_until(lambda: count(path, " CONN ") == 3)

            nats_server.stop()
            await wait_until(lambda: count(path, "STREAM event=disconnected") == 1)
            assert count(path, "events published meanwhile may be missing") == 1

            nats_server.start()
            await wait_until(lambda: count(path, "STREAM event=reconnected") == 1, timeout=20)
            await wait_until(lambda: agent.is_connected, timeout=20)
            await publish(agent, connection(10))
            await wait_until(lambda: count(path, " CONN ") == 4)

            lines = audit_lines(path)
            gaps = [line for line in lines if " GAP " in line]
            assert len(gaps) == 1
            assert "GAP missing=6 host=web1 cpu=0 seq=4..9 reason=nats-disconnected" in gaps[0]
            assert lines.index(gaps[0]) + 1 == next(i for i, line in enumerate(lines) if " seq=10 " in line)
            tg.cancel_scope.cancel()
    finally:
        await agent.close()
        await consumer.close()
