"""The request/reply API on tool.api.>: serving, errors, client helper."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import msgspec
import pytest
from nats.aio.client import Client as NATS

from pipeline.bus.api import ApiError, ApiServer, Handler, api_request

pytestmark = pytest.mark.anyio


async def _status(body: bytes) -> bytes:
    return b'{"state": "running", "mode": "prevent"}'


async def _validate(body: bytes) -> bytes:
    text = body.decode()
    if "oops" in text:
        line = text.splitlines().index("oops") + 1
        raise ApiError("unknown key 'oops'", where={"line": line})
    return msgspec.json.encode({"ok": True, "diagnostics": [], "bytes": len(body)})


async def _broken(body: bytes) -> bytes:
    raise RuntimeError("bug")


HANDLERS: dict[str, Handler] = {
    "status": _status,
    "policy": _status,
    "stats": _status,
    "policy.validate": _validate,
    "broken": _broken,
}


@asynccontextmanager
async def serving(nc: NATS, handlers: dict[str, Handler] = HANDLERS) -> AsyncIterator[ApiServer]:
    """Run an API server on ``nc`` for the duration of the block."""
    server = ApiServer(nc, handlers)
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        yield server
        tg.cancel_scope.cancel()


async def test_consumer_calls_status(agent_nc: NATS, consumer_nc: NATS) -> None:
    """A consumer may call the API and gets the handler's reply decoded."""
    async with serving(agent_nc):
        with anyio.fail_after(5):
            reply = await api_request(consumer_nc, "status")
        assert reply == {"state": "running", "mode": "prevent"}


async def test_request_body_reaches_handler(agent_nc: NATS, consumer_nc: NATS) -> None:
    """policy.validate gets the policy text as the request body."""
    async with serving(agent_nc):
        with anyio.fail_after(5):
            reply = await api_request(consumer_nc, "policy.validate", b"rules:\n  - allow\n")
        assert reply == {"ok": True, "diagnostics": [], "bytes": 17}


async def test_bad_request_is_a_json_error_with_where(agent_nc: NATS, consumer_nc: NATS) -> None:
    """A handler's ApiError becomes {"error", "where"} and api_request raises it."""
    async with serving(agent_nc) as api:
        with anyio.fail_after(5), pytest.raises(ApiError) as caught:
            await api_request(consumer_nc, "policy.validate", b"rules:\noops\n")
        assert caught.value.message == "unknown key 'oops'"
        assert caught.value.where == {"line": 2}
        assert api.errors == 1


async def test_raw_error_reply_shape(agent_nc: NATS, consumer_nc: NATS) -> None:
    """The wire format of an error, for clients other than api_request."""
    async with serving(agent_nc):
        with anyio.fail_after(5):
            msg = await consumer_nc.request("tool.api.nope", b"", timeout=5)
        body = msgspec.json.decode(msg.data)
        assert body["where"] == "nope"
        assert body["error"].startswith("unknown endpoint 'nope'")


async def test_handler_crash_is_internal_error(agent_nc: NATS, consumer_nc: NATS) -> None:
    """An unexpected exception is logged and replied as internal error; the server keeps serving."""
    async with serving(agent_nc):
        with anyio.fail_after(5), pytest.raises(ApiError, match="internal error") as caught:
            await api_request(consumer_nc, "broken")
        assert caught.value.where == "broken"
        with anyio.fail_after(5):
            assert (await api_request(consumer_nc, "stats"))["state"] == "running"


async def test_raise_on_error_false_returns_error_dict(agent_nc: NATS, consumer_nc: NATS) -> None:
    """Callers that prefer the dict can ask for it."""
    async with serving(agent_nc):
        with anyio.fail_after(5):
            reply = await api_request(consumer_nc, "nope", raise_on_error=False)
        assert reply["where"] == "nope"


async def test_no_agent_means_no_responders(consumer_nc: NATS) -> None:
    """Without a server the helper says nobody serves the API."""
    with anyio.fail_after(5), pytest.raises(ApiError, match="no agent"):
        await api_request(consumer_nc, "status")


async def test_requests_are_served_concurrently(agent_nc: NATS, consumer_nc: NATS) -> None:
    """A slow request does not hold up another one."""
    release = anyio.Event()

    async def slow(body: bytes) -> bytes:
        await release.wait()
        return b'{"slow": true}'

    async def fast(body: bytes) -> bytes:
        release.set()
        return b'{"fast": true}'

    server = ApiServer(agent_nc, {"slow": slow, "fast": fast})
    results: dict[str, object] = {}

    async def call(name: str) -> None:
        results[name] = await api_request(consumer_nc, name)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            async with anyio.create_task_group() as calls:
                calls.start_soon(call, "slow")
                calls.start_soon(call, "fast")
            tg.cancel_scope.cancel()
    assert results == {"slow": {"slow": True}, "fast": {"fast": True}}
