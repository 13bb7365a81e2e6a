"""A round trip that proves the server has processed everything sent before it.

nats-py's ``flush()`` writes its PING straight to the socket, ahead of commands (SUB, PUB)
still queued for the client's flusher task, so the PONG can come back before the server has
seen them. A subscriber that signals "ready" after one flush may still miss the first
messages, and a publisher may count a batch as confirmed too early. Two round trips close
the gap: while the first is in flight the flusher writes the queue out, and the second PING
goes behind it.
"""

from __future__ import annotations

from nats.aio.client import Client as NATS

DEFAULT_TIMEOUT_S = 5


async def server_barrier(nc: NATS, timeout: int = DEFAULT_TIMEOUT_S) -> None:
    """Return once the server has processed every command sent on ``nc`` before the call.

    Args:
        nc: A connected client.
        timeout: Seconds to wait for each round trip.

    Raises:
        nats.errors.FlushTimeoutError: The server did not answer in time.
        nats.errors.ConnectionClosedError: The connection is closed.
    """
    await nc.flush(timeout=timeout)
    await nc.flush(timeout=timeout)
