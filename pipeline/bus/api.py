"""The agent's request/reply API on ``tool.api.<name>``: server loop and client helper.

Endpoints are injected by the caller (the agent wires ``status``, ``policy``, ``stats``
and ``policy.validate``). A handler gets the request body and returns the JSON reply body.
Errors are replied as ``{"error": "<message>", "where": <location or null>}``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.abc
import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from pipeline.bus.barrier import server_barrier

log = structlog.get_logger(__name__)

API_ROOT = "tool.api"
STANDARD_ENDPOINTS = ("status", "policy", "stats", "policy.validate")
DEFAULT_TIMEOUT_S = 5.0
MAX_CONCURRENT_REQUESTS = 16

Handler = Callable[[bytes], Awaitable[bytes]]
Where = str | int | dict[str, Any] | None


class ApiError(Exception):
    """An API request failed; raised by a handler (bad request) or by :func:`api_request`.

    Attributes:
        message: What went wrong, for a person.
        where: Where: the endpoint, or a location in the request (e.g. ``{"line": 3}``).
    """

    def __init__(self, message: str, where: Where = None) -> None:
        """Create the error.

        Args:
            message: What went wrong.
            where: Where it went wrong, if known.
        """
        super().__init__(message)
        self.message = message
        self.where = where


class ErrorReply(msgspec.Struct, frozen=True):
    """The body of every error reply."""

    error: str
    where: Where = None


_encoder = msgspec.json.Encoder()
_reply_decoder = msgspec.json.Decoder(dict[str, Any])


def error_reply(message: str, where: Where = None) -> bytes:
    """Encode an error reply body."""
    return _encoder.encode(ErrorReply(error=message, where=where))


class ApiServer:
    """Answers requests on ``tool.api.>`` with the injected handlers.

    Requests are served concurrently (at most ``max_concurrent`` at once); a request for
    an unknown endpoint, or a handler raising :class:`ApiError`, gets an error reply; any
    other exception is logged and replied as ``internal error``.
    """

    def __init__(
        self,
        nc: NATS,
        handlers: Mapping[str, Handler],
        *,
        root: str = API_ROOT,
        max_concurrent: int = MAX_CONCURRENT_REQUESTS,
    ) -> None:
        """Create the server (it serves once :meth:`run` is started).

        Args:
            nc: Connected client allowed to subscribe on ``tool.api.>`` and reply.
            handlers: Endpoint name (subject after ``tool.api.``) to handler.
            root: Subject prefix.
            max_concurrent: Most requests handled at once.
        """
        self._nc = nc
        self._handlers = dict(handlers)
        self._root = root
        self._slots = anyio.Semaphore(max_concurrent)
        self.requests = 0
        self.errors = 0

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; signals started once subscribed on the server.

        Args:
            task_status: Signalled once requests are being received.
        """
        sub = await self._nc.subscribe(f"{self._root}.>")
        try:
            await server_barrier(self._nc)
            log.info("api_serving", root=self._root, endpoints=sorted(self._handlers))
            task_status.started()
            async with anyio.create_task_group() as tg:
                async for msg in sub.messages:
                    await self._slots.acquire()
                    tg.start_soon(self._serve, msg)
        finally:
            with anyio.CancelScope(shield=True):
                if not self._nc.is_closed:
                    await sub.unsubscribe()

    async def _serve(self, msg: Msg) -> None:
        try:
            if not msg.reply:
                log.warning("api_request_without_reply", subject=msg.subject)
                return
            self.requests += 1
            name = msg.subject[len(self._root) + 1 :]
            reply = await self._answer(name, msg.data)
            try:
                await self._nc.publish(msg.reply, reply)
            except nats.errors.Error as exc:
                log.warning("api_reply_failed", endpoint=name, error=repr(exc))
        finally:
            self._slots.release()

    async def _answer(self, name: str, body: bytes) -> bytes:
        handler = self._handlers.get(name)
        if handler is None:
            self.errors += 1
            known = ", ".join(sorted(self._handlers))
            return error_reply(f"unknown endpoint {name!r}; known: {known}", where=name)
        try:
            return await handler(body)
        except ApiError as exc:
            self.errors += 1
            return error_reply(exc.message, exc.where if exc.where is not None else name)
        except Exception:
            self.errors += 1
            log.exception("api_handler_failed", endpoint=name)
            return error_reply("internal error", where=name)


async def api_request(
    nc: NATS,
    name: str,
    payload: bytes = b"",
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    root: str = API_ROOT,
    raise_on_error: bool = True,
) -> dict[str, Any]:
    """Call one API endpoint and return its decoded JSON reply.

    Args:
        nc: Connected client allowed to publish on ``tool.api.>`` (agent or consumer).
        name: Endpoint, e.g. ``"status"`` or ``"policy.validate"``.
        payload: Request body.
        timeout: Seconds to wait for the reply.
        root: Subject prefix.
        raise_on_error: If False, an error reply is returned as its dict instead of raised.

    Returns:
        The reply object.

    Raises:
        ApiError: The agent replied with an error (unless ``raise_on_error`` is False),
            replied with something other than a JSON object, or nobody serves the API.
        TimeoutError: No reply in time.
    """
    try:
        msg = await nc.request(f"{root}.{name}", payload, timeout=timeout)
    except nats.errors.NoRespondersError:
        raise ApiError("no agent is serving the API (is it running?)", where=name) from None
    except nats.errors.TimeoutError:
        raise TimeoutError(f"no reply from {root}.{name} within {timeout}s") from None
    try:
        reply = _reply_decoder.decode(msg.data)
    except msgspec.DecodeError as exc:
        raise ApiError(f"reply is not a JSON object: {exc}", where=name) from None
    if raise_on_error and "error" in reply and set(reply) <= {"error", "where"}:
        raise ApiError(str(reply["error"]), reply.get("where"))
    return reply
