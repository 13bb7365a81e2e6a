"""The consumer examples receive events from a real server with the consumer credentials."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client as NATS

from pipeline.bus.credentials import credentials_path
from pipeline.bus.server import EmbeddedNats
from pipeline.events import Event, encoder, subject_for

from .bus_testkit import LineReader, events

pytestmark = pytest.mark.anyio
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "consumers"


async def _run_consumer(command: list[str], cwd: Path, agent_nc: NATS, batch: list[Event]) -> list[str]:
    """Start a consumer, wait for "ready" on stderr, publish, and return its stdout lines."""
    async with await anyio.open_process(command, cwd=cwd, stdin=subprocess.DEVNULL) as process:
        assert process.stdout is not None and process.stderr is not None
        try:
            with anyio.fail_after(30):
                await LineReader(process.stderr).wait_for("ready")
                for event in batch:
                    await agent_nc.publish(subject_for(event), encoder.encode(event))
                await agent_nc.flush()
                lines = await LineReader(process.stdout).read_all()
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
    return lines


def _check(lines: list[str], batch: list[Event]) -> None:
    assert len(lines) == len(batch), lines
    for line, event in zip(lines, batch, strict=True):
        subject, kind, event_id, _ = line.split(" ", 3)
        assert (subject, kind, event_id) == (subject_for(event), "connection", event.id)


async def test_python_consumer(nats_server: EmbeddedNats, agent_nc: NATS) -> None:
    """examples/consumers/python/consumer.py prints every event."""
    batch = events(5)
    creds = credentials_path(nats_server.state_dir, "consumer")
    command = [sys.executable, "consumer.py", "--creds", str(creds), "--count", str(len(batch))]
    _check(await _run_consumer(command, EXAMPLES / "python", agent_nc, batch), batch)


def _node_ready() -> str | None:
    """Return why the Node example cannot run, or None; installs its locked dependencies."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return "node or npm is not installed"
    directory = EXAMPLES / "node"
    if not (directory / "node_modules" / "nats").is_dir():
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=directory, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            return f"npm ci failed: {result.stderr[-500:]}"
    return None


async def test_node_consumer(nats_server: EmbeddedNats, agent_nc: NATS) -> None:
    """examples/consumers/node/consumer.mjs prints every event (skip without node, unless REQUIRE_NODE=1)."""
    reason = _node_ready()
    if reason is not None:
        if os.environ.get("REQUIRE_NODE") == "1":
            pytest.fail(f"REQUIRE_NODE=1 but {reason}")
        pytest.skip(reason)
    batch = events(5)
    creds = credentials_path(nats_server.state_dir, "consumer")
    command = ["node", "consumer.mjs", "--creds", str(creds), "--count", str(len(batch))]
    _check(await _run_consumer(command, EXAMPLES / "node", agent_nc, batch), batch)
