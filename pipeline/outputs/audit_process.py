"""The audit writer in a process of its own, started and watched by the agent.

Rendering and writing an audit line costs tens of microseconds of Python. In the agent's
process that time came out of the pipeline's core: with folding off, the agent's CPU per event
went from about 10 to about 59 µs with the audit log on (docs/performance.md). As its own
process the writer subscribes to NATS like any other consumer and runs on another core; the
agent pays nothing per event.

The parent side (:class:`AuditProcess`) starts ``python -m pipeline.outputs.audit_process``,
hands it its settings and the NATS URL on stdin (never in argv or the environment, where
other users could read the credentials), and waits for ``ready``: the child has opened the log
and its subscription is confirmed, so no event published afterwards can miss it. It restarts
a child that dies, and the restarted child writes a line saying events published meanwhile
are missing from the log. At shutdown the agent first confirms its last events with the
server, then sends SIGTERM: the child drains its subscription, writes everything already
delivered, writes ``stopped`` and exits.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
import structlog

_log = structlog.get_logger(__name__)

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Waits before successive restarts of a child that keeps dying; the last one repeats."""


class AuditSettings(msgspec.Struct, forbid_unknown_fields=True):
    """What the child needs: the log, its rotation, and where the events are."""

    path: str
    nats_url: str
    max_bytes: int
    max_age_s: float
    keep: int
    process_events: bool
    fsync: bool = False
    restarts: int = 0
    """How many times the agent restarted the writer before this start (0 = first start)."""
    last_exit: str = ""
    """How the previous writer ended, for the restart line."""
    verbose: bool = False
    parent_pid: int = 0
    """The agent: the writer stops when it is gone (parent-death signal, checked at start)."""


class AuditProcessError(Exception):
    """The audit writer could not be started."""


class AuditProcess:
    """Starts the audit writer's process, restarts it when it dies, stops it last.

    Args:
        settings: the child's settings; ``restarts``/``last_exit`` are filled in here.
    """

    def __init__(self, settings: AuditSettings) -> None:
        self._settings = settings
        self._process: anyio.abc.Process | None = None
        self._stopping = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        """The running child's pid."""
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        """Start the child and wait until it is subscribed.

        Raises:
            AuditProcessError: it exited or did not get ready in time; the message says why
                (the child's own error is in the agent's log, which the child shares).
        """
        settings = msgspec.structs.replace(self._settings, restarts=self.restarts, parent_pid=os.getpid())
        process = await anyio.open_process(
            [sys.executable, "-m", "pipeline.outputs.audit_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # the agent's stderr: the child logs like the agent
            # Its own session: a Ctrl-C at the agent's terminal must not stop the writer before
            # the agent has published its last events; the agent stops it after that.
            start_new_session=True,
        )
        self._process = process
        assert process.stdin is not None and process.stdout is not None
        await process.stdin.send(msgspec.json.encode(settings))
        await process.stdin.aclose()
        answer = b""
        with anyio.move_on_after(READY_TIMEOUT_S):
            try:
                while not answer.endswith(b"\n"):
                    answer += await process.stdout.receive()
            except anyio.EndOfStream:
                pass
        if answer.strip() != b"ready":
            await self._kill()
            code = process.returncode
            raise AuditProcessError(
                f"the audit writer for {settings.path} "
                + (f"exited with status {code}" if code is not None else f"was not ready in {READY_TIMEOUT_S:.0f}s")
                + "; its error is logged above (audit_failed). Fix it, or turn the audit log off with audit_log: ''"
            )
        _log.info("audit_writer_started", pid=process.pid, path=settings.path, restarts=self.restarts)

    async def supervise(self) -> None:
        """Restart the child whenever it dies, until :meth:`stop`; run after :meth:`start`."""
        backoff = 0
        while not self._stopping:
            process = self._process
            if process is None:
                return
            started = time.monotonic()
            code = await process.wait()
            if self._stopping:
                return
            exit_text = f"signal {-code}" if code < 0 else f"status {code}"
            _log.error("audit_writer_died", pid=process.pid, exit=exit_text, restarts=self.restarts)
            if time.monotonic() - started > 60:
                backoff = 0  # it ran a while: this is a new failure, not a crash loop
            await anyio.sleep(RESTART_BACKOFF_S[min(backoff, len(RESTART_BACKOFF_S) - 1)])
            if self._stopping:
                return
            backoff += 1
            self.restarts += 1
            self._settings = msgspec.structs.replace(self._settings, last_exit=exit_text)
            try:
                await self.start()
            except AuditProcessError as exc:
                _log.error("audit_writer_restart_failed", error=str(exc))

    async def stop(self) -> None:
        """SIGTERM the child and wait for it to write what it holds (idempotent)."""
        self._stopping = True
        process = self._process
        if process is None or process.returncode is not None:
            return
        with anyio.CancelScope(shield=True):  # also on the agent's error paths
            process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(STOP_TIMEOUT_S):
                await process.wait()
                return
            _log.warning("audit_writer_kill", pid=process.pid, timeout_s=STOP_TIMEOUT_S)
            await self._kill()

    async def _kill(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.kill()
        with anyio.CancelScope(shield=True):
            await process.wait()


# ---- the child -------------------------------------------------------------------------------


async def _child(settings: AuditSettings) -> int:
    import nats

    from pipeline.outputs.audit import AuditSubscriber, AuditWriter
    from pipeline.outputs.nats_callbacks import NatsConnectionEvents

    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        try:
            writer = AuditWriter(
                Path(settings.path),
                max_bytes=settings.max_bytes,
                max_age_s=settings.max_age_s,
                keep=settings.keep,
                process_events=settings.process_events,
                fsync=settings.fsync,
            )
        except OSError as exc:
            _log.error("audit_failed", path=settings.path, error=f"cannot open the audit log: {exc}")
            return 1
        try:
            if settings.restarts:
                writer.note(
                    "AUDIT",
                    [
                        ("event", "writer_restarted"),
                        ("restarts", settings.restarts),
                        ("previous_exit", settings.last_exit or None),
                        ("msg", "audit: the writer died and was restarted; events published meanwhile are missing"),
                    ],
                )
            callbacks = NatsConnectionEvents()
            try:
                nc = await nats.connect(
                    settings.nats_url,
                    max_reconnect_attempts=-1,
                    name=f"tool-audit-{os.getpid()}",
                    **callbacks.connect_options(),
                )
            except Exception as exc:
                _log.error("audit_failed", error=f"cannot connect to NATS: {exc!r}")
                return 1
            subscriber = AuditSubscriber(nc, writer, connection_events=callbacks)
            await subscriber.start()
            sys.stdout.write("ready\n")
            sys.stdout.flush()
            tick = min(60.0, settings.max_age_s / 10)
            async with anyio.create_task_group() as tg:

                async def rotate() -> None:
                    while True:
                        await anyio.sleep(tick)
                        writer.maybe_rotate()

                tg.start_soon(rotate)
                async for _ in signals:
                    break
                tg.cancel_scope.cancel()
            callbacks.remove_listener(subscriber)  # closing below is not an outage
            await _finish(nc, subscriber, writer)
        finally:
            writer.close()
    return 0


async def _finish(nc: Any, subscriber: Any, writer: Any) -> None:
    """Write what was delivered before the stop, say what could not be, and close.

    The agent stops the writer after its last events are confirmed, so they are on their way:
    a ping's answer comes after them. The server may be gone already (the whole service stopped
    at once, or the agent was killed): what arrived is still written, and what sits unhandled
    when the time is up is counted in the log.
    """
    with anyio.move_on_after(STOP_TIMEOUT_S / 4):
        try:
            await nc.flush(timeout=int(STOP_TIMEOUT_S / 4))
        except Exception as exc:
            _log.warning("audit_flush_failed", error=repr(exc))
    with anyio.move_on_after(STOP_TIMEOUT_S / 2):
        while subscriber.pending():
            await anyio.sleep(0.01)
    left = subscriber.pending()
    if left:
        writer.note(
            "AUDIT",
            [
                ("event", "unwritten_at_stop"),
                ("messages", left),
                ("msg", "audit: stopped before writing these delivered events"),
            ],
        )
        _log.error("audit_unwritten_at_stop", messages=left)
    try:
        await nc.close()
    except Exception as exc:  # already closed by a failed connection: nothing left to do
        _log.warning("audit_close_failed", error=repr(exc))


def _die_with_parent(parent_pid: int) -> None:
    """SIGTERM from the kernel when the agent dies (set here, so no helper binary is needed)."""
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if parent_pid and os.getppid() != parent_pid:  # it died before the signal was set
        os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    """Entry point of the child: settings on stdin, ``ready`` on stdout, logs on stderr."""
    from pipeline.cli import setup_logging

    try:
        settings = msgspec.json.decode(sys.stdin.buffer.read(), type=AuditSettings)
    except msgspec.DecodeError as exc:
        print(f"audit writer: bad settings on stdin: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.verbose)
    _die_with_parent(settings.parent_pid)
    return anyio.run(_child, settings)


if __name__ == "__main__":
    sys.exit(main())
