"""The events stream's configuration on a real nats-server: persist mode, and updates the server refuses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import PersistMode
from nats.js.errors import ServerError

from pipeline.agent import open_event_stream
from pipeline.bus.publish import Publisher
from pipeline.bus.server import EVENTS_STREAM, EmbeddedNats
from pipeline.bus.stream import (
    PersistModeMismatch,
    StreamConfigError,
    ensure_stream,
    server_has_persist_modes,
    stream_config,
)
from pipeline.config import load_config
from pipeline.events import Event

from .bus_testkit import events

pytestmark = pytest.mark.anyio

# nats-server from before stream persist modes; deploy/setup.sh --test puts it here.
OLD_NATS = Path(os.environ.get("TOOL_TEST_OLD_NATS", "/opt/tool/compat/nats-server-2.11.11"))


@pytest.fixture
def old_nats_url(tmp_path: Path) -> Iterator[str]:
    """A real nats-server 2.11 with JetStream on a free loopback port (skipped when it is not
    installed, unless REQUIRE_NATS_COMPAT=1, where that fails)."""
    if not os.access(OLD_NATS, os.X_OK):
        reason = f"{OLD_NATS} not found: deploy/setup.sh --test installs it"
        if os.environ.get("REQUIRE_NATS_COMPAT") == "1":
            pytest.fail(f"REQUIRE_NATS_COMPAT=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(OLD_NATS), "-js", "-sd", str(tmp_path / "js"), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{OLD_NATS} did not start") from None
                time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def _publish(nc: NATS, n: int) -> Publisher:
    """Publish ``n`` events as the agent does; confirmed means stored."""
    send, receive = anyio.create_memory_object_stream[Event](64)
    publisher = Publisher(nc, receive, stream_ack=EVENTS_STREAM)
    async with anyio.create_task_group() as tg:
        await tg.start(publisher.run)
        async with send:
            for event in events(n):
                await send.send(event)
    return publisher


def test_stream_config_names_persist_mode_only_for_async() -> None:
    """Default leaves the field out (servers before 2.12 see nothing new); async needs file storage."""
    assert stream_config().persist_mode is None
    assert stream_config(persist="async").persist_mode == PersistMode.ASYNC
    with pytest.raises(ValueError, match="needs file storage"):
        stream_config(storage="memory", persist="async")
    with pytest.raises(ValueError, match="'default' or 'async'"):
        stream_config(persist="sync")  # type: ignore[arg-type]


@pytest.mark.parametrize(("setting", "shown"), [(None, None), ("default", None), ("async", PersistMode.ASYNC)])
async def test_the_agent_creates_the_stream_with_the_configured_persist_mode(
    agent_nc: NATS, setting: str | None, shown: PersistMode | None
) -> None:
    """From TOOL_EVENT_STREAM_PERSIST to what the server reports in stream info."""
    js = agent_nc.jetstream()
    await js.delete_stream(EVENTS_STREAM)  # the fixture made one with the defaults
    environ = {} if setting is None else {"TOOL_EVENT_STREAM_PERSIST": setting}
    await open_event_stream(agent_nc, load_config(None, environ=environ))
    info = await js.stream_info(EVENTS_STREAM)
    assert info.config.persist_mode == shown
    publisher = await _publish(agent_nc, 500)
    assert publisher.counters().confirmed == 500
    assert (await js.stream_info(EVENTS_STREAM)).state.messages == 500


@pytest.mark.parametrize(("kept", "wanted"), [("default", "async"), ("async", "default")])
async def test_the_server_refuses_to_change_the_persist_mode_of_a_stream(
    agent_nc: NATS, kept: str, wanted: str
) -> None:
    """What ensure_stream's own check stands for: nats-server will not update persist_mode either way."""
    js = agent_nc.jetstream()
    await js.delete_stream(EVENTS_STREAM)
    await js.add_stream(stream_config(persist=kept))  # type: ignore[arg-type]
    with pytest.raises(ServerError, match="can not change persist mode"):
        await js.update_stream(stream_config(persist=wanted))  # type: ignore[arg-type]


@pytest.mark.parametrize(("kept", "wanted"), [("default", "async"), ("async", "default")])
async def test_a_persist_mode_change_is_logged_with_what_to_do_and_the_stream_keeps_storing(
    agent_nc: NATS, capsys: pytest.CaptureFixture[str], kept: str, wanted: str
) -> None:
    """The agent starts, says the stream must be deleted or the setting reverted, and stores as before."""
    js = agent_nc.jetstream()
    await js.delete_stream(EVENTS_STREAM)
    await open_event_stream(agent_nc, load_config(None, environ={"TOOL_EVENT_STREAM_PERSIST": kept}))
    with pytest.raises(PersistModeMismatch) as refused:
        await ensure_stream(js, stream_config(persist=wanted))  # type: ignore[arg-type]
    assert (refused.value.kept, refused.value.wanted) == (kept, wanted)

    capsys.readouterr()
    await open_event_stream(agent_nc, load_config(None, environ={"TOOL_EVENT_STREAM_PERSIST": wanted}))
    logged = capsys.readouterr().out
    assert "event_stream_not_configured" in logged
    assert f"nats stream rm {EVENTS_STREAM}" in logged and "event_stream_persist" in logged
    assert "Traceback" not in logged

    info = await js.stream_info(EVENTS_STREAM)
    assert info.config.persist_mode == (PersistMode.ASYNC if kept == "async" else None)
    publisher = await _publish(agent_nc, 300)
    assert publisher.counters().confirmed == 300
    assert (await js.stream_info(EVENTS_STREAM)).state.messages == 300


async def test_a_storage_change_is_reported_as_such_even_when_the_persist_mode_differs_too(agent_nc: NATS) -> None:
    """File with async, then memory (which cannot be async): the server's storage refusal is the
    reason given, not a persist mode to ask for again."""
    js = agent_nc.jetstream()
    await js.delete_stream(EVENTS_STREAM)
    await ensure_stream(js, stream_config(persist="async"))
    with pytest.raises(StreamConfigError, match="storage") as refused:
        await ensure_stream(js, stream_config(storage="memory"))
    assert not isinstance(refused.value, PersistModeMismatch)


def test_persist_modes_are_known_from_nats_server_2_12() -> None:
    assert not server_has_persist_modes("2.11.11")
    assert not server_has_persist_modes("2.10.29")
    assert server_has_persist_modes("2.12.0")
    assert server_has_persist_modes("2.15.1")
    assert server_has_persist_modes("3.0.0")
    assert server_has_persist_modes("0.0.0")  # nats-py's "unknown": the server's answer tells
    assert server_has_persist_modes("")


async def test_a_refusal_by_the_server_is_a_stream_config_error_with_its_reason(agent_nc: NATS) -> None:
    """E.g. file to memory: JetStream cannot change a stream's storage; the server's reason is kept."""
    with pytest.raises(StreamConfigError, match=f"refused the configuration of stream {EVENTS_STREAM}: .*storage"):
        await ensure_stream(agent_nc.jetstream(), stream_config(storage="memory"))


async def test_with_default_persistence_an_acknowledged_event_survives_sigkill(tmp_path: Path) -> None:
    """nats-server killed the moment the publisher confirmed: every confirmed event is there after a
    restart. (With async it is not: docs/nats.md has the figures; that loss is not deterministic.)"""
    state = tmp_path / "state"
    n = 3000
    async with EmbeddedNats(state, port=0) as server:
        nc = await nats.connect(server.credentials["agent"].url_with_auth(), allow_reconnect=False)
        try:
            await open_event_stream(nc, load_config(None, environ={}))
            publisher = await _publish(nc, n)
            assert publisher.counters().confirmed == n
            assert server._process is not None
            os.kill(server._process.pid, signal.SIGKILL)
        finally:
            await nc.close()
    async with EmbeddedNats(state, port=0) as server:
        nc = await nats.connect(server.credentials["agent"].url_with_auth())
        try:
            assert (await nc.jetstream().stream_info(EVENTS_STREAM)).state.messages == n
        finally:
            await nc.close()


async def test_an_older_server_gets_the_default_at_every_start_and_is_never_asked_to_recreate(
    old_nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """nats-server 2.11 has no persist modes: async is logged as ignored at each start, the
    stream is made and then updated without it, and it stores every event."""
    nc = await nats.connect(old_nats_url)
    try:
        config = load_config(None, environ={"TOOL_EVENT_STREAM_PERSIST": "async"})
        for _start in range(2):
            capsys.readouterr()
            await open_event_stream(nc, config)
            logged = capsys.readouterr().out
            assert "event_stream_persist_ignored" in logged and "2.11.11" in logged
            assert "event_stream_not_configured" not in logged
        js = nc.jetstream()
        assert (await js.stream_info(EVENTS_STREAM)).config.persist_mode is None
        publisher = await _publish(nc, 200)
        assert publisher.counters().confirmed == 200
        assert (await js.stream_info(EVENTS_STREAM)).state.messages == 200
    finally:
        await nc.close()
