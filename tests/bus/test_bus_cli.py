"""``tool-pipeline events``: live lines, JSON lines, replay with --since, and formatting."""

from __future__ import annotations

import argparse
import datetime
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client as NATS

from pipeline.bus.cli import events_main, parse_duration, register
from pipeline.bus.publish import Publisher
from pipeline.bus.render import format_event
from pipeline.bus.server import EmbeddedNats
from pipeline.events import (
    Cgroup,
    Endpoint,
    EnforcementEvent,
    Event,
    LossEvent,
    PolicyEvent,
    Process,
    ProcessEvent,
)

from .bus_testkit import connection_event, events

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parents[2]


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tool-pipeline")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["events", *argv])


async def _publish(nc: NATS, batch: Sequence[Event]) -> None:
    send, receive = anyio.create_memory_object_stream[Event](16)
    async with anyio.create_task_group() as tg:
        await tg.start(Publisher(nc, receive).run)
        async with send:
            for event in batch:
                await send.send(event)


async def test_prints_live_events_one_line_each(nats_server: EmbeddedNats, agent_nc: NATS) -> None:
    """With the default (state dir) credentials, each event is printed as one readable line."""
    out = io.StringIO()
    args = _parse("--state-dir", str(nats_server.state_dir), "--count", "3")
    batch = events(3)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: events_main(args, out=out, task_status=task_status))
            await _publish(agent_nc, batch)
    lines = out.getvalue().splitlines()
    assert lines == [format_event(e) for e in batch]
    assert lines[0].endswith(
        "BLOCKED egress curl[1234] uid=1000 10.0.0.1:40000 -> 1.2.3.4:443/tcp rule=deny-x"
    )


async def test_json_lines_and_subject_filter(nats_server: EmbeddedNats, agent_nc: NATS) -> None:
    """--json prints the raw payload; --subject filters with NATS wildcards."""
    out = io.StringIO()
    url = nats_server.credentials["consumer"].url_with_auth()
    args = _parse("--nats", url, "--json", "--count", "2", "--subject", "tool.events.*.connection.*.allowed")
    batch = [
        connection_event(verdict="blocked"),
        connection_event(verdict="allowed"),
        connection_event(verdict="blocked"),
        connection_event(verdict="allowed"),
    ]
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: events_main(args, out=out, task_status=task_status))
            await _publish(agent_nc, batch)
    received = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["id"] for r in received] == [batch[1].id, batch[3].id]
    assert all(r["type"] == "connection" for r in received)


async def test_since_replays_in_a_subprocess(nats_server: EmbeddedNats, agent_nc: NATS) -> None:
    """Events published before the command started are replayed with --since."""
    batch = events(5)
    await _publish(agent_nc, batch)
    code = "import sys; from pipeline.bus.cli import main_for_tests; sys.exit(main_for_tests(sys.argv[1:]))"
    with anyio.fail_after(30):
        result = await anyio.run_process(
            [
                sys.executable,
                "-c",
                code,
                "--state-dir",
                str(nats_server.state_dir),
                "--since",
                "5m",
                "--count",
                "5",
            ],
            cwd=REPO,
            check=False,
        )
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert lines == [format_event(e) for e in batch]


async def test_missing_credentials_is_a_clear_error(tmp_path: Path) -> None:
    """Without credentials the command says what to do and exits 2."""
    assert await events_main(_parse("--state-dir", str(tmp_path))) == 2


def test_parse_duration() -> None:
    """Durations combine units."""
    assert parse_duration("90s") == datetime.timedelta(seconds=90)
    assert parse_duration("1h30m") == datetime.timedelta(minutes=90)
    assert parse_duration("2d") == datetime.timedelta(days=2)
    assert parse_duration("250ms") == datetime.timedelta(milliseconds=250)
    for bad in ("", "5", "m5", "5x", "1h 5m"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)


def test_format_every_event_type() -> None:
    """Every event type has a one-line rendering."""
    utc = datetime.UTC
    t = 1_700_000_000_123_000_000
    process = Process(pid=42, uid=0, comm="sshd", exe="/usr/sbin/sshd")
    assert format_event(
        ProcessEvent(id="p", time_ns=t, host="h", kind="exec", process=process, cgroup=Cgroup(id=1)), utc
    ) == ("22:13:20.123 PROCESS exec sshd[42] uid=0 exe=/usr/sbin/sshd")
    loss = LossEvent(
        id="l",
        time_ns=t,
        host="h",
        ring_buffer_full=5,
        ring_buffer_full_delta=1,
        folded=10,
        folded_delta=2,
        sequence_gaps=0,
        sequence_gaps_delta=0,
    )
    assert format_event(loss, utc) == (
        "22:13:20.123 LOSS ring_buffer_full=5(+1) folded=10(+2) sequence_gaps=0(+0)"
    )
    policy = PolicyEvent(
        id="x", time_ns=t, host="h", kind="rejected", sources=["a.yaml"], generation=3, errors=["line 2: bad"]
    )
    assert format_event(policy, utc) == (
        "22:13:20.123 POLICY rejected generation=3 rules=0 sources=a.yaml errors=line 2: bad"
    )
    enforcement = EnforcementEvent(
        id="e",
        time_ns=t,
        host="h",
        action="block-destination",
        reason="anomaly",
        trigger_event="c1",
        remote=Endpoint("::1", 53),
    )
    assert format_event(enforcement, utc) == (
        "22:13:20.123 ENFORCE block-destination reason='anomaly' trigger=c1 remote=[::1]:53"
    )
