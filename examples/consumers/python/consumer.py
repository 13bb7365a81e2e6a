"""Example third-party consumer: print every event the agent publishes (nats-py, core NATS).

Usage::

    python consumer.py --creds /var/lib/tool/credentials/consumer.json [--subject S] [--count N]

It depends on nats-py only, not on the agent's code: events are plain JSON whose schema is
docs/events.schema.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.parse


def server_url(args: argparse.Namespace) -> str:
    """Build ``nats://user:pass@host:port`` from ``--url``, ``NATS_URL`` or a credentials file."""
    if args.url:
        return str(args.url)
    if args.creds:
        with open(args.creds, encoding="utf-8") as handle:
            creds = json.load(handle)
        parts = urllib.parse.urlsplit(creds["url"])
        user = urllib.parse.quote(creds["user"], safe="")
        password = urllib.parse.quote(creds["password"], safe="")
        return f"{parts.scheme}://{user}:{password}@{parts.hostname}:{parts.port}"
    env = os.environ.get("NATS_URL")
    if env:
        return env
    sys.exit("give --creds FILE, --url URL or NATS_URL")


async def consume(url: str, subject: str, count: int | None) -> None:
    """Subscribe and print events until ``count`` were printed (or forever)."""
    import nats  # imported here so --help works without nats-py

    nc = await nats.connect(url, name="example-python-consumer")
    try:
        sub = await nc.subscribe(subject)
        # Two round trips: nats-py's flush() can overtake the queued SUB; the second cannot.
        await nc.flush()
        await nc.flush()  # the server has the subscription: events from now on are seen
        print("ready", file=sys.stderr, flush=True)
        seen = 0
        async for msg in sub.messages:
            event = json.loads(msg.data)
            print(msg.subject, event.get("type"), event.get("id"), msg.data.decode(), flush=True)
            seen += 1
            if count is not None and seen >= count:
                break
    finally:
        await nc.close()


def main() -> None:
    """Parse arguments and run the consumer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--creds", help="consumer credentials JSON written by the agent")
    parser.add_argument("--url", help="nats://user:pass@host:port")
    parser.add_argument("--subject", default="tool.events.>")
    parser.add_argument("--count", type=int, help="exit after N events")
    args = parser.parse_args()
    try:
        asyncio.run(consume(server_url(args), args.subject, args.count))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
