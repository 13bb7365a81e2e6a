"""Published event types: the JSON contract on NATS subjects ``tool.events.>``.

Every message is one of the tagged structs below, encoded as JSON. The tag
field is ``type``. The JSON Schema in docs/ is generated from these types
(``tool-pipeline schema events``, ``python -m pipeline.bus.schema``), so this module is the single source of
truth for consumers. Fields are only ever added (with defaults), never
renamed or removed, within one ``version``.

The structs are declared with ``gc=False``: they never take part in a reference
cycle, and keeping tens of thousands of them per second out of the cyclic
garbage collector's bookkeeping is one of the pipeline's larger savings. This
does not change their JSON.
"""

from __future__ import annotations

import functools
from typing import Literal

import msgspec

EVENT_VERSION = 1

Verdict = Literal["allowed", "blocked", "would-block", "alert"]
Direction = Literal["egress", "ingress", "listen", "raw"]
Mode = Literal["detect", "prevent"]
ConnectionKind = Literal["connect", "sendmsg", "inbound", "accept", "bind", "socket"]


class Endpoint(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """One end of a connection."""

    address: str
    port: int
    name: str | None = None  # DNS name, where known


class Ancestor(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """A parent in the process chain."""

    pid: int
    exe: str | None = None
    comm: str | None = None


class Process(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """The process that made or owns the connection."""

    pid: int  # process id (tgid)
    tid: int = 0
    ppid: int = 0
    uid: int = 0
    gid: int = 0
    user: str | None = None
    comm: str = ""
    exe: str | None = None
    cmdline: list[str] = []
    exec_id: int = 0  # kernel start time of the process, tells a recycled pid apart
    ancestors: list[Ancestor] = []


class Cgroup(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """Where the process lives."""

    id: int
    path: str | None = None
    systemd_unit: str | None = None
    container_id: str | None = None


class RuleRef(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """The policy entry that decided, or the default."""

    id: int  # 0 = no rule matched (the default decided)
    name: str | None = None
    policy: str | None = None  # file the rule came from
    explanation: str = ""


class Anomaly(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """How unusual this connection is for its executable (0 = seen often, 1 = never seen)."""

    score: float
    reasons: list[str] = []


class ConnectionEvent(msgspec.Struct, frozen=True, omit_defaults=True, gc=False, tag="connection", tag_field="type"):
    """A decision on a connection, a listener or a raw socket."""

    id: str
    time_ns: int  # wall clock, ns since the epoch
    host: str
    kind: ConnectionKind
    direction: Direction
    protocol: str  # tcp, udp, icmp, ..., or a number
    family: Literal["ipv4", "ipv6", "packet"]
    verdict: Verdict
    mode: Mode
    known: bool  # a rule matched (False: the default decided: an unknown connection)
    rule: RuleRef
    local: Endpoint
    remote: Endpoint
    process: Process
    cgroup: Cgroup
    netns_cookie: int = 0
    repeat: int = 0  # identical decisions folded into this one since the previous event of the flow
    anomaly: Anomaly | None = None
    cpu: int = 0
    seq: int = 0
    version: int = EVENT_VERSION


class ProcessEvent(msgspec.Struct, frozen=True, omit_defaults=True, gc=False, tag="process", tag_field="type"):
    """A process executed a program or exited."""

    id: str
    time_ns: int
    host: str
    kind: Literal["exec", "exit"]
    process: Process
    cgroup: Cgroup
    exit_code: int | None = None  # exit: the exit code, or minus the signal that ended the process
    cpu: int = 0
    seq: int = 0
    version: int = EVENT_VERSION


class LossEvent(msgspec.Struct, frozen=True, omit_defaults=True, gc=False, tag="loss", tag_field="type"):
    """Periodic account of everything not delivered one event per decision.

    Counters are totals since the agent started; ``*_delta`` since the previous report.
    """

    id: str
    time_ns: int
    host: str
    ring_buffer_full: int  # records the kernel could not queue (lost)
    ring_buffer_full_delta: int
    folded: int  # repeats folded into a flow's counter (not lost: counted)
    folded_delta: int
    sequence_gaps: int  # records missing from the per-CPU sequence, as seen in user space
    sequence_gaps_delta: int
    decode_errors: int = 0
    version: int = EVENT_VERSION


class PolicyEvent(msgspec.Struct, frozen=True, omit_defaults=True, gc=False, tag="policy", tag_field="type"):
    """A policy was loaded into the kernel, or rejected (the previous one stays in force)."""

    id: str
    time_ns: int
    host: str
    kind: Literal["loaded", "rejected"]
    sources: list[str]
    generation: int
    rules: int = 0
    errors: list[str] = []
    duration_ms: float = 0.0
    reason: str = ""
    """Why: ``start``, ``reload`` (SIGHUP, file change, API) or ``cgroup-created`` (the same
    policy swapped in again because a cgroup its selectors match appeared)."""
    version: int = EVENT_VERSION


class EnforcementEvent(msgspec.Struct, frozen=True, omit_defaults=True, gc=False, tag="enforcement", tag_field="type"):
    """The enforcement stage acted on an event (for example blocked an anomalous destination)."""

    id: str
    time_ns: int
    host: str
    action: str  # e.g. "block-destination"
    reason: str
    trigger_event: str  # id of the event that caused it
    exe: str | None = None
    remote: Endpoint | None = None
    version: int = EVENT_VERSION


Event = ConnectionEvent | ProcessEvent | LossEvent | PolicyEvent | EnforcementEvent

SUBJECT_ROOT = "tool.events"


_connection_subjects: dict[tuple[str, str, str], str] = {}  # (host, direction, verdict) -> subject


@functools.lru_cache(maxsize=4096)
def host_token(host: str) -> str:
    """Make a host name usable as one NATS subject token."""
    cleaned = "".join(c if (c.isalnum() or c in "-_") else "_" for c in host)
    return cleaned or "unknown"


def subject_for(event: Event) -> str:
    """The NATS subject an event is published on.

    ``tool.events.<host>.connection.<direction>.<verdict>``,
    ``tool.events.<host>.process.<exec|exit>``, ``tool.events.<host>.loss.report``,
    ``tool.events.<host>.policy.<loaded|rejected>``,
    ``tool.events.<host>.enforcement.<action>``.
    """
    if isinstance(event, ConnectionEvent):
        key = (event.host, event.direction, event.verdict)
        subject = _connection_subjects.get(key)
        if subject is None:
            subject = f"{SUBJECT_ROOT}.{host_token(event.host)}.connection.{event.direction}.{event.verdict}"
            if len(_connection_subjects) > 1024:
                _connection_subjects.clear()
            _connection_subjects[key] = subject
        return subject
    host = host_token(event.host)
    if isinstance(event, ProcessEvent):
        return f"{SUBJECT_ROOT}.{host}.process.{event.kind}"
    if isinstance(event, LossEvent):
        return f"{SUBJECT_ROOT}.{host}.loss.report"
    if isinstance(event, PolicyEvent):
        return f"{SUBJECT_ROOT}.{host}.policy.{event.kind}"
    return f"{SUBJECT_ROOT}.{host}.enforcement.{host_token(event.action)}"


encoder = msgspec.json.Encoder()
decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)
