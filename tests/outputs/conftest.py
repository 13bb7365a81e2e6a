"""Fixtures for the output tests: a real nats-server process and event factories."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from outputs_testkit import NatsServer


@pytest.fixture
def anyio_backend() -> str:
    """nats-py runs on asyncio."""
    return "asyncio"


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A running nats-server (JetStream off) on a free port."""
    server = NatsServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
