"""Helpers shared by the bus tests: event factories and waiting for subprocess output."""

from __future__ import annotations

import itertools
import time

import anyio
import anyio.abc
from anyio.streams.text import TextReceiveStream

from pipeline.events import Cgroup, ConnectionEvent, Endpoint, Event, Process, RuleRef

_ids = itertools.count(1)


def connection_event(
    *,
    seq: int | None = None,
    verdict: str = "blocked",
    host: str = "testhost",
    time_ns: int | None = None,
) -> ConnectionEvent:
    """A realistic connection event; ``seq`` orders them."""
    number = next(_ids) if seq is None else seq
    return ConnectionEvent(
        id=f"ev-{number}",
        time_ns=time.time_ns() if time_ns is None else time_ns,
        host=host,
        kind="connect",
        direction="egress",
        protocol="tcp",
        family="ipv4",
        verdict=verdict,  # type: ignore[arg-type]
        mode="prevent",
        known=True,
        rule=RuleRef(id=7, name="deny-x"),
        local=Endpoint("10.0.0.1", 40000),
        remote=Endpoint("1.2.3.4", 443),
        process=Process(pid=1234, uid=1000, comm="curl"),
        cgroup=Cgroup(id=1),
        seq=number,
    )


def events(n: int) -> list[Event]:
    """``n`` connection events with seq 1..n."""
    return [connection_event(seq=i) for i in range(1, n + 1)]


class LineReader:
    """Reads a subprocess's output line by line (no sleeps: waits on the stream)."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream) -> None:
        self._text = TextReceiveStream(stream)
        self._buffer = ""
        self.lines: list[str] = []

    async def next_line(self) -> str | None:
        """Return the next line, or None at end of output."""
        while "\n" not in self._buffer:
            try:
                self._buffer += await self._text.receive()
            except anyio.EndOfStream:
                if self._buffer:
                    line, self._buffer = self._buffer, ""
                    self.lines.append(line)
                    return line
                return None
        line, self._buffer = self._buffer.split("\n", 1)
        self.lines.append(line)
        return line

    async def wait_for(self, text: str) -> str:
        """Return the first line containing ``text``; fail at end of output."""
        while True:
            line = await self.next_line()
            if line is None:
                raise AssertionError(f"output ended before {text!r}; got {self.lines!r}")
            if text in line:
                return line

    async def read_all(self) -> list[str]:
        """Read until the end of output and return every line read so far."""
        while await self.next_line() is not None:
            pass
        return self.lines
