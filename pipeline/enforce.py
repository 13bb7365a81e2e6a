"""Enforcement stage: a NATS subscriber that acts on what needs user space.

In prevent mode, when a connection's anomaly score crosses the configured
threshold and the configured action is ``block-destination``, it adds a
kernel deny of that destination for that executable (on top of the policy
files, kept across reloads) and publishes an EnforcementEvent saying so.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Awaitable, Callable

import anyio
import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from pipeline.config import AnomalyConfig
from pipeline.events import ConnectionEvent, Endpoint, EnforcementEvent, host_token
from pipeline.outputs.nats_callbacks import confirm_subscriptions
from pipeline.policy_runtime import DynamicDeny, PolicyRuntime

log = structlog.get_logger("tool.enforce")

_PROTOCOLS = {"tcp": 6, "udp": 17}


class Enforcer:
    """Decides and applies responses to anomalous connections.

    Args:
        runtime: the policy in force (dynamic denies are added there).
        config: threshold and action.
        mode: returns the agent's current mode.
        publish: sends an event on the bus.
        host: this host's name.
    """

    def __init__(
        self,
        runtime: PolicyRuntime,
        config: AnomalyConfig,
        mode: Callable[[], str],
        publish: Callable[[EnforcementEvent], Awaitable[None]],
        host: str,
    ) -> None:
        self.runtime = runtime
        self.config = config
        self.mode = mode
        self.publish = publish
        self.host = host
        self.actions = 0
        self._decoder = msgspec.json.Decoder(ConnectionEvent)

    async def handle(self, event: ConnectionEvent) -> EnforcementEvent | None:
        """Act on one connection event; returns the enforcement event when something was done."""
        if (
            self.config.action != "block-destination"
            or self.mode() != "prevent"
            or event.anomaly is None
            or event.anomaly.score < self.config.threshold
            or event.direction != "egress"
            or event.verdict == "blocked"
            or not event.process.exe
            or event.protocol not in _PROTOCOLS
        ):
            return None
        addr = ipaddress.ip_address(event.remote.address)
        if isinstance(addr, ipaddress.IPv4Address):
            network = ipaddress.IPv6Network(f"::ffff:{addr}/128")
        else:
            network = ipaddress.IPv6Network(f"{addr}/128")
        reason = f"anomaly score {event.anomaly.score:.2f} >= {self.config.threshold}: " + "; ".join(
            event.anomaly.reasons
        )
        deny = DynamicDeny(event.process.exe, network, event.remote.port, _PROTOCOLS[event.protocol], reason)
        generation = await anyio.to_thread.run_sync(self.runtime.add_dynamic_deny, deny)
        self.actions += 1
        out = EnforcementEvent(
            id=f"enforce-{generation}-{self.actions}",
            time_ns=time.time_ns(),
            host=self.host,
            action="block-destination",
            reason=reason,
            trigger_event=event.id,
            exe=event.process.exe,
            remote=Endpoint(address=event.remote.address, port=event.remote.port),
        )
        log.warning(
            "enforcement_applied",
            exe=deny.exe,
            remote=event.remote.address,
            port=deny.port,
            generation=generation,
        )
        await self.publish(out)
        return out

    async def run(
        self, nc: NATS, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Subscribe to this host's connection events and act on them until cancelled."""
        send, recv = anyio.create_memory_object_stream[Msg](1024)

        async def on_msg(msg: Msg) -> None:
            await send.send(msg)

        sub = await nc.subscribe(f"tool.events.{host_token(self.host)}.connection.>", cb=on_msg)
        await confirm_subscriptions(nc)
        task_status.started()
        try:
            async with recv:
                async for msg in recv:
                    try:
                        event = self._decoder.decode(msg.data)
                    except msgspec.DecodeError as exc:
                        log.error("enforce_bad_event", error=str(exc))
                        continue
                    try:
                        await self.handle(event)
                    except Exception as exc:  # a failed response must not stop the stage
                        log.error("enforcement_failed", error=str(exc), event=event.id)
        finally:
            await sub.unsubscribe()
