"""Fixtures for the bus tests: a real embedded nats-server per test, on a free port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from pipeline.bus.server import EmbeddedNats
from pipeline.bus.stream import ensure_stream


@pytest.fixture
def anyio_backend() -> str:
    """nats-py runs on asyncio only."""
    return "asyncio"


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    """A started embedded server with a tmp state dir and an ephemeral port."""
    async with EmbeddedNats(tmp_path / "state", port=0) as server:
        yield server


@pytest.fixture
async def agent_nc(nats_server: EmbeddedNats) -> AsyncIterator[NATS]:
    """A connection with the agent's credentials; the events stream exists."""
    nc = await nats.connect(nats_server.credentials["agent"].url_with_auth(), name="test-agent")
    await ensure_stream(nc.jetstream())
    yield nc
    await nc.close()


@pytest.fixture
async def consumer_nc(nats_server: EmbeddedNats) -> AsyncIterator[NATS]:
    """A connection with the consumer's credentials."""
    nc = await nats.connect(nats_server.credentials["consumer"].url_with_auth(), name="test-consumer")
    yield nc
    await nc.close()
