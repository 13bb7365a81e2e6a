"""Benchmark: events/s from a bounded memory stream through Publisher to a local nats-server.

Usage: python benchmarks/bench_publish.py [N] [--msg-id]

Starts an embedded server in a temporary state dir, creates the events stream, and pushes
N connection events through a Publisher, as the pipeline does. Prints the rate.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import anyio
import nats

from pipeline.bus.publish import Publisher
from pipeline.bus.server import EmbeddedNats
from pipeline.bus.stream import ensure_stream, stream_config
from pipeline.events import Cgroup, ConnectionEvent, Endpoint, Event, Process, RuleRef


def make_events(n: int) -> list[Event]:
    """N distinct, realistic connection events."""
    now = time.time_ns()
    return [
        ConnectionEvent(
            id=f"bench-{i}",
            time_ns=now + i,
            host="bench",
            kind="connect",
            direction="egress",
            protocol="tcp",
            family="ipv4",
            verdict="allowed",
            mode="prevent",
            known=True,
            rule=RuleRef(id=3, name="allow-https"),
            local=Endpoint("10.0.0.1", 40000 + i % 20000),
            remote=Endpoint("1.2.3.4", 443),
            process=Process(pid=1234, uid=1000, comm="curl", exe="/usr/bin/curl"),
            cgroup=Cgroup(id=1, systemd_unit="user@1000.service"),
            seq=i,
        )
        for i in range(n)
    ]


async def bench(n: int, msg_id: bool) -> None:
    """Run the benchmark once and print the result."""
    batch = make_events(n)
    with tempfile.TemporaryDirectory() as state:
        async with EmbeddedNats(Path(state), port=0) as server:
            nc = await nats.connect(server.credentials["agent"].url_with_auth())
            await ensure_stream(nc.jetstream(), stream_config(max_bytes=4 << 30))
            send, receive = anyio.create_memory_object_stream[Event](4096)
            publisher = Publisher(nc, receive, msg_id_header=msg_id)
            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                await tg.start(publisher.run)
                async with send:
                    for event in batch:
                        # A busy upstream stage: no checkpoint per event while there is room.
                        try:
                            send.send_nowait(event)
                        except anyio.WouldBlock:
                            await send.send(event)
            elapsed = time.perf_counter() - started
            counters = publisher.counters()
            await nc.close()
    assert counters.confirmed == n, counters
    print(
        f"{n} events in {elapsed:.3f}s: {n / elapsed:,.0f} events/s "
        f"(batches={counters.batches}, msg_id_header={msg_id})"
    )


if __name__ == "__main__":
    count = int(next((a for a in sys.argv[1:] if a.isdigit()), "200000"))
    anyio.run(bench, count, "--msg-id" in sys.argv)
