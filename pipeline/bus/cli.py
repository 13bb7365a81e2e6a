"""``tool-pipeline events``: print the agent's events live, or replayed from the stream."""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from pathlib import Path
from typing import Any, TextIO

import anyio
import anyio.abc
import msgspec
import nats
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from pipeline.bus.barrier import server_barrier
from pipeline.bus.credentials import CredentialsError, load_credentials
from pipeline.bus.render import format_event
from pipeline.bus.server import EVENTS_STREAM
from pipeline.events import SUBJECT_ROOT, decoder

log = structlog.get_logger(__name__)

DEFAULT_STATE_DIR = Path("/var/lib/tool")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_FETCH_BATCH = 256
_FETCH_WAIT_S = 1.0


def parse_duration(text: str) -> datetime.timedelta:
    """Parse ``90s``, ``5m``, ``1h30m``, ``2d`` (units ms, s, m, h, d).

    Args:
        text: The duration.

    Returns:
        The duration.

    Raises:
        argparse.ArgumentTypeError: Not a duration.
    """
    text = text.strip()
    total = 0.0
    position = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        position = match.end()
    if position != len(text) or not text:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 30s, 5m, 1h30m, 2d)")
    return datetime.timedelta(seconds=total)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``events`` options to a parser.

    Args:
        parser: The ``events`` subcommand's parser.
    """
    parser.add_argument(
        "--nats",
        metavar="URL",
        help="server URL with credentials, nats://user:pass@host:port "
        "(default: the embedded server, with the consumer credentials from --state-dir)",
    )
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="agent state directory")
    parser.add_argument(
        "--subject",
        default=f"{SUBJECT_ROOT}.>",
        help="subject filter, e.g. 'tool.events.*.connection.*.blocked' (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print each event as one raw JSON line")
    parser.add_argument(
        "--since",
        type=parse_duration,
        metavar="DURATION",
        help="first replay the events of the last DURATION from the stream (e.g. 10m), then follow",
    )
    parser.add_argument("--count", type=_positive_int, metavar="N", help="exit after N events")
    parser.add_argument("--stream", default=EVENTS_STREAM, help=argparse.SUPPRESS)


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``events`` subcommand; it sets ``func`` to a synchronous entry point.

    Args:
        subparsers: The result of ``parser.add_subparsers()``.
    """
    parser = subparsers.add_parser(
        "events",
        help="print the agent's events as they are published",
        description="Subscribe to the agent's events on NATS and print one line per event.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run_events)


def run_events(args: argparse.Namespace) -> int:
    """Synchronous entry point for ``tool-pipeline events``.

    Args:
        args: Parsed arguments.

    Returns:
        Exit status.
    """
    try:
        return anyio.run(events_main, args)
    except KeyboardInterrupt:
        return 130


def _server_url(args: argparse.Namespace) -> str:
    if args.nats:
        return str(args.nats)
    return load_credentials(Path(args.state_dir), "consumer").url_with_auth()


async def events_main(
    args: argparse.Namespace,
    *,
    out: TextIO | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> int:
    """Print events until ``--count`` is reached (or forever).

    Args:
        args: Parsed arguments (see :func:`add_arguments`).
        out: Where to print (default stdout).
        task_status: Signalled once subscribed, so events published from then on are seen.

    Returns:
        Exit status: 0, or 2 when the credentials or server cannot be used.
    """
    stream = out if out is not None else sys.stdout
    try:
        url = _server_url(args)
    except CredentialsError as exc:
        print(f"tool-pipeline events: {exc}", file=sys.stderr)
        return 2
    said: set[str] = set()

    async def on_error(exc: Exception) -> None:
        # One line per kind of trouble instead of nats-py's tracebacks; it keeps reconnecting.
        kind = type(exc).__name__
        if kind not in said:
            said.add(kind)
            print(f"tool-pipeline events: NATS: {exc!r} (reconnecting)", file=sys.stderr)

    async def on_reconnect() -> None:
        said.clear()
        print("tool-pipeline events: NATS: reconnected", file=sys.stderr)

    try:
        nc = await nats.connect(
            url,
            name="tool-pipeline events",
            max_reconnect_attempts=-1,
            error_cb=on_error,
            reconnected_cb=on_reconnect,
        )
    except (nats.errors.Error, OSError) as exc:
        print(f"tool-pipeline events: cannot connect to NATS: {exc!r}", file=sys.stderr)
        return 2
    printer = _Printer(stream, raw=bool(args.json), count=args.count)
    try:
        if args.since is not None:
            await _replay(nc, args, printer, task_status)
        else:
            await _follow(nc, args, printer, task_status)
    finally:
        with anyio.CancelScope(shield=True):
            await nc.close()
    return 0


class _Printer:
    """Prints events and tells when ``--count`` is reached."""

    def __init__(self, out: TextIO, *, raw: bool, count: int | None) -> None:
        self._out = out
        self._raw = raw
        self._left = count

    def done(self) -> bool:
        return self._left is not None and self._left <= 0

    def print(self, msg: Msg) -> None:
        if self._raw:
            self._out.write(msg.data.decode("utf-8", errors="replace") + "\n")
        else:
            try:
                line = format_event(decoder.decode(msg.data))
            except msgspec.DecodeError as exc:
                line = f"? {msg.subject}: undecodable event ({exc}): {msg.data[:200]!r}"
            self._out.write(line + "\n")
        self._out.flush()
        if self._left is not None:
            self._left -= 1


async def _follow(
    nc: NATS, args: argparse.Namespace, printer: _Printer, task_status: anyio.abc.TaskStatus[None]
) -> None:
    """Live events only (core NATS subscription)."""
    sub = await nc.subscribe(args.subject)
    await server_barrier(nc)
    task_status.started()
    async for msg in sub.messages:
        printer.print(msg)
        if printer.done():
            return


async def _replay(
    nc: NATS, args: argparse.Namespace, printer: _Printer, task_status: anyio.abc.TaskStatus[None]
) -> None:
    """Events from ``now - since`` on, from the stream, then new ones as they come."""
    start = datetime.datetime.now(datetime.UTC) - args.since
    js = nc.jetstream()
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME,
        opt_start_time=start.isoformat().replace("+00:00", "Z"),
        ack_policy=AckPolicy.NONE,
        inactive_threshold=30.0,
    )
    psub = await js.pull_subscribe(args.subject, stream=args.stream, config=config)
    task_status.started()
    try:
        while not printer.done():
            try:
                msgs = await psub.fetch(_FETCH_BATCH, timeout=_FETCH_WAIT_S)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                printer.print(msg)
                if printer.done():
                    return
    finally:
        with anyio.CancelScope(shield=True):
            if not nc.is_closed:
                await psub.unsubscribe()


def main_for_tests(argv: list[str]) -> int:
    """Run ``events`` with ``argv`` as if it were ``tool-pipeline events ARGV`` (for tests and tools).

    Args:
        argv: Arguments after ``events``.

    Returns:
        Exit status.
    """
    parser = argparse.ArgumentParser(prog="tool-pipeline events")
    add_arguments(parser)
    return run_events(parser.parse_args(argv))
