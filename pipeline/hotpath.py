"""The connection-event hot path: ring-buffer bytes to published JSON with little work per event.

A busy host sends the same few identities, rules and verdict combinations over and over; only
the sequence number, the time, the ports and the addresses change from one event to the next.
So the hot path reads each connection record straight out of the ring buffer's shared memory
with one ``struct`` call, and keys everything that repeats on the raw bytes the kernel wrote:

* the 56 bytes of the task (pid, tgid, ppid, uid, gid, exec id, cgroup id, comm) name the
  process's :class:`Identity`: its enriched ``Process`` and ``Cgroup`` and their JSON;
* the header and the enum bytes (kind, flags, family, protocol, direction, verdict, mode,
  action) name the event's fixed text fields and its NATS subject;
* (rule id, policy generation) names the rule reference.

Each of those is encoded once, as :class:`msgspec.Raw` JSON, and an event is a small
:class:`_WireConnection` whose encoding is byte for byte what ``msgspec.json.encode`` gives for
the typed :class:`pipeline.events.ConnectionEvent` (the typed path stays the reference: the
tests compare the two on random records).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import msgspec

from loaders import abi
from loaders.ringbuf import RINGBUF_BUSY_BIT, RINGBUF_DISCARD_BIT, RingReader
from pipeline import decode as dec
from pipeline.events import Cgroup, Process, RuleRef

# The fields of struct tool_conn_event the pipeline uses, in one unpack (sock_cookie skipped).
CONN = struct.Struct("<8sQQII56sQ8x8sII16s16sHHI")
assert CONN.size == abi.CONN_RECORD.size
# Indices into a CONN tuple.
HEAD = 0  # kind u16, size u16, flags u32: the header fields that class an event
TS_NS = 1
SEQ = 2
CPU = 3
ABI = 4
TASK = 5  # struct tool_task, raw
NETNS = 6
ENUMS = 7  # family u16, protocol, direction, verdict, mode, action, sock_type
RULE_ID = 8
POLICY_GEN = 9
LOCAL_ADDR = 10
REMOTE_ADDR = 11
LOCAL_PORT = 12
REMOTE_PORT = 13
REPEAT = 14

_TASK = struct.Struct("<IIIIIIQQ16s")
_ENUMS = struct.Struct("<HBBBBBB")
_HEAD = struct.Struct("<HHI")
_RING_HEADER = struct.Struct("<I4xH")  # length with busy/discard bits, page offset, the record's kind
_LEN_MASK = ~(RINGBUF_BUSY_BIT | RINGBUF_DISCARD_BIT) & 0xFFFFFFFF

ConnTuple = tuple[Any, ...]
Record = ConnTuple | dec.ExecRecord


class DecodeErrors:
    """Counts records that do not match the ABI; logs the first few."""

    def __init__(self, log: Callable[..., Any]) -> None:
        self.count = 0
        self._log = log

    def add(self, error: str, size: int) -> None:
        self.count += 1
        if self.count <= 10:
            self._log("decode_error", error=error, size=size)


def drain(
    reader: RingReader, see_gap: Callable[[int, int], None], expected: dict[int, int],
    opened: dict[int, Any], errors: DecodeErrors, limit: int,
) -> list[Record]:  # fmt: skip
    """Decode up to ``limit`` records waiting in the ring, then give their space back.

    Connection records become CONN tuples; process records go through the reference decoder.
    Per-CPU sequence numbers are checked inline while they arrive in order (``expected`` and
    ``opened`` are the gap tracker's); anything else goes to ``see_gap``.

    Stops before a record the kernel has reserved but not yet submitted.
    """
    consumer, producer = reader.window()
    data = reader.data
    mask = reader.mask
    header = _RING_HEADER.unpack_from
    unpack = CONN.unpack_from
    conn_size = CONN.size
    first_conn, last_conn = abi.EV_CONNECT, abi.EV_SOCKET
    version = abi.ABI_VERSION
    out: list[Record] = []
    append = out.append
    pos = consumer
    n = 0
    while pos < producer and n < limit:
        off = pos & mask
        length, kind = header(data, off)
        if length & RINGBUF_BUSY_BIT:
            break
        size = length & _LEN_MASK
        pos += (size + 15) & ~7
        if length & RINGBUF_DISCARD_BIT:
            continue
        n += 1
        if size == conn_size and first_conn <= kind <= last_conn:
            f = unpack(data, off + 8)
            if f[ABI] != version:
                errors.add(f"record ABI version {f[ABI]}, this agent speaks {version}", size)
                continue
            cpu = f[CPU]
            seq = f[SEQ]
            if seq == expected.get(cpu) and cpu not in opened:
                expected[cpu] = seq + 1
            else:
                see_gap(cpu, seq)
            append(f)
            continue
        rec = _other_record(bytes(data[off + 8 : off + 8 + size]), see_gap, errors)
        if rec is not None:
            append(rec)
    reader.release(pos)
    return out


def decode_records(
    raws: list[bytes], see_gap: Callable[[int, int], None], expected: dict[int, int],
    opened: dict[int, Any], errors: DecodeErrors,
) -> list[Record]:  # fmt: skip
    """:func:`drain` for records already copied out of the ring (the libbpf consumer's path)."""
    unpack = CONN.unpack
    conn_size = CONN.size
    first_conn, last_conn = abi.EV_CONNECT, abi.EV_SOCKET
    version = abi.ABI_VERSION
    out: list[Record] = []
    append = out.append
    for raw in raws:
        size = len(raw)
        if size == conn_size and first_conn <= raw[0] | raw[1] << 8 <= last_conn:
            f = unpack(raw)
            if f[ABI] != version:
                errors.add(f"record ABI version {f[ABI]}, this agent speaks {version}", size)
                continue
            cpu = f[CPU]
            seq = f[SEQ]
            if seq == expected.get(cpu) and cpu not in opened:
                expected[cpu] = seq + 1
            else:
                see_gap(cpu, seq)
            append(f)
            continue
        rec = _other_record(raw, see_gap, errors)
        if rec is not None:
            append(rec)
    return out


def _other_record(raw: bytes, see_gap: Callable[[int, int], None], errors: DecodeErrors) -> Record | None:
    """A record the fast path does not take: a process record through the reference decoder,
    anything that does not match the ABI counted as a decode error (None)."""
    try:
        rec = dec.decode(raw)
    except dec.DecodeError as exc:
        errors.add(str(exc), len(raw))
        return None
    if isinstance(rec, dec.ConnRecord):  # a connection record of an unexpected size
        errors.add(f"connection record of {len(raw)} bytes, expected {CONN.size}", len(raw))
        return None
    see_gap(rec.cpu, rec.seq)
    return rec


def task_of(raw: bytes) -> dec.Task:
    """The Task of a CONN tuple's raw task bytes."""
    pid, tgid, ppid, uid, gid, _pad, exec_id, cgroup_id, comm = _TASK.unpack(raw)
    return dec.Task(pid, tgid, ppid, uid, gid, exec_id, cgroup_id, comm.split(b"\0", 1)[0].decode("utf-8", "replace"))


def conn_record(f: ConnTuple) -> dec.ConnRecord:
    """The reference decoder's record for a CONN tuple (for the slow paths and the tests)."""
    kind, _size, flags = _HEAD.unpack(f[HEAD])
    family, protocol, direction, verdict, mode, action, sock_type = _ENUMS.unpack(f[ENUMS])
    return dec.ConnRecord(
        kind, flags, f[TS_NS], f[SEQ], f[CPU], task_of(f[TASK]), f[NETNS], 0,
        family, protocol, direction, verdict, mode, action, sock_type, f[RULE_ID], f[POLICY_GEN],
        dec.addr_text(f[LOCAL_ADDR]), dec.addr_text(f[REMOTE_ADDR]), f[LOCAL_PORT], f[REMOTE_PORT], f[REPEAT],
    )  # fmt: skip


class Identity:
    """Who sent an event: the enriched process and cgroup, and their JSON for the wire."""

    __slots__ = ("cgroup", "exe_key", "process", "raw", "tgid")

    def __init__(self, process: Process, cgroup: Cgroup, encode: Callable[[Any], bytes]) -> None:
        self.process = process
        self.cgroup = cgroup
        self.tgid = process.pid
        self.exe_key = process.exe or f"comm:{process.comm}"  # what the baseline learns under
        # The "process" value, then the "cgroup" member: the two are adjacent in every event.
        self.raw = msgspec.Raw(encode(process) + b',"cgroup":' + encode(cgroup))


class RuleEntry:
    """A rule reference and its JSON."""

    __slots__ = ("raw", "ref")

    def __init__(self, ref: RuleRef, encode: Callable[[Any], bytes]) -> None:
        self.ref = ref
        self.raw = msgspec.Raw(encode(ref))


class WireConnection(
    msgspec.Struct, omit_defaults=True, gc=False, tag="connection", tag_field="type"
):  # fmt: skip
    """What :class:`pipeline.events.ConnectionEvent` encodes to, with the repeating parts pre-encoded.

    ``host`` carries the fixed members from ``host`` to ``known`` (one Raw may hold several
    members: it is copied verbatim after ``"host":``); ``process`` carries ``process`` and
    ``cgroup``. The field order and defaults are ConnectionEvent's.
    """

    id: str
    time_ns: int
    host: msgspec.Raw
    rule: msgspec.Raw
    local: msgspec.Raw
    remote: msgspec.Raw
    process: msgspec.Raw
    netns_cookie: int = 0
    repeat: int = 0
    anomaly: msgspec.Raw | None = None
    cpu: int = 0
    seq: int = 0


class Flow:
    """What events of one (header, enums, addresses, ports) combination share, encoded."""

    __slots__ = ("destination", "head", "local", "remote", "subject")

    def __init__(self, head: msgspec.Raw, subject: bytes, local: msgspec.Raw, remote: msgspec.Raw, destination: str):
        self.head = head  # the members from "host" to "known"
        self.subject = subject
        self.local = local
        self.remote = remote
        self.destination = destination  # what the anomaly baseline learns


class Encoded:
    """Events encoded for NATS, in order: subject, JSON payload and event id of each."""

    __slots__ = ("ids", "payloads", "subjects")

    def __init__(self) -> None:
        self.subjects: list[bytes] = []
        self.payloads: list[bytes] = []
        self.ids: list[str] = []

    def add(self, subject: bytes, payload: bytes, event_id: str) -> None:
        self.subjects.append(subject)
        self.payloads.append(payload)
        self.ids.append(event_id)

    def __len__(self) -> int:
        return len(self.payloads)


class EventEncoder:
    """Builds the JSON of connection events from CONN tuples, caching what repeats.

    Args:
        host: this host's name (a member of every event and a token of its subject).
        instance: the agent instance, the prefix of event ids.
        boot_offset_ns: wall clock minus CLOCK_BOOTTIME, added to the kernel's timestamps.
    """

    def __init__(self, host: str, instance: str, boot_offset_ns: int) -> None:
        from pipeline.events import SUBJECT_ROOT, host_token

        self.host = host
        self.instance = instance
        self.boot_offset_ns = boot_offset_ns
        self.encode = msgspec.json.Encoder().encode
        self._subject_prefix = f"{SUBJECT_ROOT}.{host_token(host)}.connection."
        self.flows: dict[tuple[Any, ...], Flow] = {}
        self._heads: dict[tuple[bytes, bytes], tuple[msgspec.Raw, bytes]] = {}
        self._endpoints: dict[tuple[Any, ...], msgspec.Raw] = {}
        self.id_prefixes: dict[int, str] = {}

    def flow(self, key: tuple[Any, ...]) -> Flow:
        """The Flow of ``key`` = CONN fields (HEAD, ENUMS, REMOTE_ADDR, REMOTE_PORT, LOCAL_ADDR,
        LOCAL_PORT) (cache miss)."""
        head, enums, remote_addr, remote_port, local_addr, local_port = key
        _kind, _size, flags = _HEAD.unpack(head)
        _family, protocol, direction, _verdict, _mode, _action, _sock_type = _ENUMS.unpack(enums)
        v4 = bool(flags & abi.F_V4)
        members, subject = self._heads.get((head, enums)) or self._head(head, enums)
        proto = dec.PROTOCOL_NAMES.get(protocol, str(protocol))
        remote, local = dec.addr_text(remote_addr), dec.addr_text(local_addr)
        if direction == abi.DIR_EGRESS:
            destination = f"{remote}:{remote_port}/{proto}"
        elif direction == abi.DIR_INGRESS:
            destination = f"from {remote} to port {local_port}/{proto}"
        elif direction == abi.DIR_LISTEN:
            destination = f"listen {local}:{local_port}/{proto}"
        else:
            destination = f"raw socket protocol {remote_port}"
        if v4 and local == "::":  # an IPv4 socket's unspecified address
            local = "0.0.0.0"
        flow = Flow(
            members,
            subject,
            self._endpoint(local, local_port),
            self._endpoint(remote, remote_port),
            destination,
        )
        if len(self.flows) > 16384:
            self.flows.clear()
        self.flows[key] = flow
        return flow

    def _head(self, head: bytes, enums: bytes) -> tuple[msgspec.Raw, bytes]:
        kind, _size, flags = _HEAD.unpack(head)
        _family, protocol, direction, verdict, mode, _action, _sock_type = _ENUMS.unpack(enums)
        v4 = bool(flags & abi.F_V4)
        direction_name = dec.DIRECTION_NAMES.get(direction, "egress")
        verdict_name = dec.VERDICT_NAMES.get(verdict, "allowed")
        # Members in ConnectionEvent's order, host to known (dicts encode in insertion order).
        members = self.encode({
            "host": self.host,
            "kind": dec.KIND_NAMES[kind],
            "direction": direction_name,
            "protocol": dec.PROTOCOL_NAMES.get(protocol, str(protocol)),
            "family": "packet" if flags & abi.F_PACKET else ("ipv4" if v4 else "ipv6"),
            "verdict": verdict_name,
            "mode": dec.MODE_NAMES.get(mode, "detect"),
            "known": not flags & abi.F_UNKNOWN,
        })  # fmt: skip
        value = (
            msgspec.Raw(members[len(b'{"host":') : -1]),
            f"{self._subject_prefix}{direction_name}.{verdict_name}".encode(),
        )
        if len(self._heads) > 4096:
            self._heads.clear()
        self._heads[(head, enums)] = value
        return value

    def _endpoint(self, address: str, port: int) -> msgspec.Raw:
        key = (address, port)
        raw = self._endpoints.get(key)
        if raw is None:
            raw = msgspec.Raw(self.encode({"address": address, "port": port}))
            if len(self._endpoints) > 16384:
                self._endpoints.clear()
            self._endpoints[key] = raw
        return raw

    def id_prefix(self, cpu: int) -> str:
        prefix = self.id_prefixes.get(cpu)
        if prefix is None:
            prefix = self.id_prefixes[cpu] = f"{self.instance}-{cpu}-"
        return prefix
