"""NATS helpers for outputs: fan-out of nats-py connection callbacks, and a subscription barrier.

nats-py takes one ``disconnected_cb``/``reconnected_cb``/``error_cb``/``closed_cb`` each at
connect time. :class:`NatsConnectionEvents` is that one callback set; outputs register
listeners on it, and the program passes :meth:`NatsConnectionEvents.connect_options` to
``nats.connect``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

_log = structlog.get_logger(__name__)


class ConnectionListener(Protocol):
    """Something that wants to hear about the NATS connection's state changes."""

    def on_disconnected(self) -> None:
        """The connection to the server was lost (nats-py is trying to reconnect)."""

    def on_reconnected(self) -> None:
        """The connection is back; subscriptions have been re-established by nats-py."""

    def on_error(self, error: Exception) -> None:
        """An asynchronous error, for example a slow consumer dropping messages."""

    def on_closed(self) -> None:
        """The connection is closed for good."""


class NatsConnectionEvents:
    """The one set of nats-py connection callbacks, fanned out to listeners."""

    def __init__(self) -> None:
        self._listeners: list[ConnectionListener] = []

    def add_listener(self, listener: ConnectionListener) -> None:
        """Register a listener (idempotent)."""
        if listener not in self._listeners:
            self._listeners.append(listener)

    def remove_listener(self, listener: ConnectionListener) -> None:
        """Unregister a listener; unknown listeners are ignored."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def connect_options(self) -> dict[str, Callable[..., Awaitable[None]]]:
        """Keyword arguments for ``nats.connect`` that route the callbacks here.

        Returns:
            ``disconnected_cb``, ``reconnected_cb``, ``error_cb`` and ``closed_cb``.
        """
        return {
            "disconnected_cb": self._disconnected,
            "reconnected_cb": self._reconnected,
            "error_cb": self._error,
            "closed_cb": self._closed,
        }

    def _each(self, name: str, call: Callable[[ConnectionListener], None]) -> None:
        for listener in list(self._listeners):
            try:
                call(listener)
            except Exception:
                _log.exception("nats_listener_failed", callback=name)

    async def _disconnected(self) -> None:
        _log.warning("nats_disconnected")
        self._each("disconnected", lambda listener: listener.on_disconnected())

    async def _reconnected(self) -> None:
        _log.info("nats_reconnected")
        self._each("reconnected", lambda listener: listener.on_reconnected())

    async def _error(self, error: Exception) -> None:
        _log.warning("nats_error", error=repr(error))
        self._each("error", lambda listener: listener.on_error(error))

    async def _closed(self) -> None:
        _log.info("nats_closed")
        self._each("closed", lambda listener: listener.on_closed())


async def confirm_subscriptions(nc: NATS, timeout: float = 10.0) -> None:
    """Return once the server has installed every subscription made so far on ``nc``.

    ``Client.flush()`` is not enough with nats-py 2.16: it writes its PING straight to
    the socket, ahead of SUB commands still in the client's pending buffer, so a
    message published right after it may find no interest yet. A message sent to a
    private inbox goes through the same buffer as the SUBs, so its round trip proves
    they were processed.

    Args:
        nc: a connected client.
        timeout: seconds to wait for the round trip.

    Raises:
        TimeoutError: the round trip did not complete in time.
    """
    arrived = anyio.Event()

    async def on_msg(_msg: Msg) -> None:
        arrived.set()

    subject = nc.new_inbox()  # _INBOX.>: a subject every client may use for replies
    sub = await nc.subscribe(subject, cb=on_msg, max_msgs=1)
    try:
        await nc.publish(subject, b"")
        with anyio.fail_after(timeout):
            await arrived.wait()
    finally:
        if not arrived.is_set() and nc.is_connected:
            await sub.unsubscribe()
