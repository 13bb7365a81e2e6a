"""The connection-event hot path: ring-buffer bytes to published JSON with little work per event.

A busy host sends the same few identities, rules and verdict combinations over and over; only
the sequence number, the time, the ports and the addresses change from one event to the next.
So the hot path reads each connection record straight out of the ring buffer's shared memory
with one ``struct`` call, and keys everything that repeats on the raw bytes the kernel wrote:

* the 56 bytes of the task (pid, tgid, ppid, uid, gid, exec id, cgroup id, comm) name the
  process's :class:`Identity`: its enriched ``Process`` and ``Cgroup`` and their JSON;
* the enum bytes with the rule id and policy generation name the rule reference;
* those, the kind and flags, and the addresses and ports name a :class:`Flow`: the event's members
  from ``host`` to ``remote``, its NATS subject and what the anomaly baseline learns.

Each of those is encoded once, and an event is one ``%`` format of those pieces and its few
numbers (:data:`CONNECTION_JSON`), then its ``PUB`` command: byte for byte what
``msgspec.json.encode`` gives for the typed :class:`pipeline.events.ConnectionEvent` (the typed
path stays the reference: the tests compare the two on random records).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import msgspec

from loaders import abi
from loaders.ringbuf import RINGBUF_BUSY_BIT, RINGBUF_DISCARD_BIT, RINGBUF_HDR_SZ, RingReader
from pipeline import decode as dec
from pipeline.events import Cgroup, Process, RuleRef

# A connection record as it sits in the ring: the ring's record header (its length word; the
# page offset skipped), then the fields of struct tool_conn_event the pipeline uses
# (sock_cookie skipped), in one unpack. What only keys a cache stays in a few byte strings:
# fewer objects per record, and each cache key is a few of them.
CONN = struct.Struct("<I4xHxxIQQII56sQ8x16s36sI")
CONN_SIZE = CONN.size - RINGBUF_HDR_SZ  # the record's own size
assert CONN_SIZE == abi.CONN_RECORD.size and CONN.size % 8 == 0
# Indices into a CONN tuple.
LENGTH = 0  # the ring header's length word: CONN_SIZE for a complete, kept connection record
KIND = 1
FLAGS = 2
TS_NS = 3
SEQ = 4
CPU = 5
ABI = 6
TASK = 7  # struct tool_task, raw
NETNS = 8
RULE = 9  # the enums (family u16, protocol, direction, verdict, mode, action, sock_type), rule id, policy generation
WHERE = 10  # local address, remote address, local port, remote port
REPEAT = 11
_RING_LENGTH = struct.Struct("<I4x")

_TASK = struct.Struct("<IIIIIIQQ16s")
_RULE = struct.Struct("<HBBBBBBII")
_WHERE = struct.Struct("<16s16sHH")
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


def conn_tuple(raw: bytes) -> ConnTuple:
    """The CONN tuple of a connection record copied out of the ring (``raw``: the record alone)."""
    return CONN.unpack(_RING_LENGTH.pack(len(raw)) + raw)


def drain(
    reader: RingReader, see_gap: Callable[[int, int], None], expected: dict[int, int],
    due: dict[int, int], errors: DecodeErrors, limit: int,
) -> list[Record]:  # fmt: skip
    """Decode up to about ``limit`` records waiting in the ring, then give their space back.

    Connection records, nearly all of the traffic, are read in runs: one ``iter_unpack`` over
    as many records as the ring holds, each taken while its ring header says it is a complete
    connection record (the header comes first in the tuple, so nothing after a record still
    being written is used). Anything else (a process record, a discarded or unfinished one, one
    that does not match the ABI) ends the run and goes through :func:`_other_record`.
    Per-CPU sequence numbers are checked inline while they arrive in order and no hole is due to
    settle (``expected`` and ``due`` are the gap tracker's); anything else goes to ``see_gap``.

    Stops before a record the kernel has reserved but not yet submitted.
    """
    consumer, producer = reader.window()
    data = reader.data
    mask = reader.mask
    length_of = _RING_LENGTH.unpack_from
    runs = CONN.iter_unpack
    span = CONN.size
    first_conn, last_conn = abi.EV_CONNECT, abi.EV_SOCKET
    version = abi.ABI_VERSION
    i_length, i_kind, i_abi, i_cpu, i_seq = LENGTH, KIND, ABI, CPU, SEQ
    out: list[Record] = []
    append = out.append
    pos = consumer
    while pos < producer and len(out) < limit:
        off = pos & mask
        before = len(out)
        for f in runs(data[off : off + span * min((producer - pos) // span, limit - before)]):
            if f[i_length] != CONN_SIZE or not first_conn <= f[i_kind] <= last_conn or f[i_abi] != version:
                break
            cpu = f[i_cpu]
            seq = f[i_seq]
            if seq == expected.get(cpu) and seq < due[cpu]:  # due has every CPU expected has
                expected[cpu] = seq + 1
            else:
                see_gap(cpu, seq)
            append(f)
        else:
            if len(out) > before:  # the run ended where the data does: read on
                pos += span * (len(out) - before)
                continue
        pos += span * (len(out) - before)
        # The record at pos is not a complete connection record, or too little is left for one.
        off = pos & mask
        (length,) = length_of(data, off)
        if length & RINGBUF_BUSY_BIT:
            break
        size = length & _LEN_MASK
        pos += (size + 15) & ~7
        if length & RINGBUF_DISCARD_BIT:
            continue
        rec = _other_record(bytes(data[off + 8 : off + 8 + size]), see_gap, errors)
        if rec is not None:
            append(rec)
    reader.release(pos)
    return out


def decode_records(
    raws: list[bytes], see_gap: Callable[[int, int], None], expected: dict[int, int],
    due: dict[int, int], errors: DecodeErrors,
) -> list[Record]:  # fmt: skip
    """:func:`drain` for records already copied out of the ring (the libbpf consumer's path)."""
    first_conn, last_conn = abi.EV_CONNECT, abi.EV_SOCKET
    version = abi.ABI_VERSION
    out: list[Record] = []
    append = out.append
    for raw in raws:
        if len(raw) == CONN_SIZE and first_conn <= raw[0] | raw[1] << 8 <= last_conn:
            f = conn_tuple(raw)
            if f[ABI] == version:
                cpu = f[CPU]
                seq = f[SEQ]
                if seq == expected.get(cpu) and seq < due[cpu]:
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
        errors.add(f"connection record of {len(raw)} bytes, expected {CONN_SIZE}", len(raw))
        return None
    see_gap(rec.cpu, rec.seq)
    return rec


def task_of(raw: bytes) -> dec.Task:
    """The Task of a CONN tuple's raw task bytes."""
    pid, tgid, ppid, uid, gid, _pad, exec_id, cgroup_id, comm = _TASK.unpack(raw)
    return dec.Task(pid, tgid, ppid, uid, gid, exec_id, cgroup_id, comm.split(b"\0", 1)[0].decode("utf-8", "replace"))


def conn_record(f: ConnTuple) -> dec.ConnRecord:
    """The reference decoder's record for a CONN tuple (for the slow paths and the tests)."""
    family, protocol, direction, verdict, mode, action, sock_type, rule_id, policy_gen = _RULE.unpack(f[RULE])
    local_addr, remote_addr, local_port, remote_port = _WHERE.unpack(f[WHERE])
    return dec.ConnRecord(
        f[KIND], f[FLAGS], f[TS_NS], f[SEQ], f[CPU], task_of(f[TASK]), f[NETNS], 0,
        family, protocol, direction, verdict, mode, action, sock_type, rule_id, policy_gen,
        dec.addr_text(local_addr), dec.addr_text(remote_addr), local_port, remote_port, f[REPEAT],
    )  # fmt: skip


def rule_of(f: ConnTuple) -> tuple[int, int]:
    """A CONN tuple's (rule id, policy generation): 0 when the mode's default decided."""
    *_enums, rule_id, policy_gen = _RULE.unpack(f[RULE])
    return rule_id, policy_gen


class Identity:
    """Who sent an event: the enriched process and cgroup, and their JSON for the wire."""

    __slots__ = ("cgroup", "exe_key", "json", "process", "tgid")

    def __init__(self, process: Process, cgroup: Cgroup, encode: Callable[[Any], bytes]) -> None:
        self.process = process
        self.cgroup = cgroup
        self.tgid = process.pid
        self.exe_key = process.exe or f"comm:{process.comm}"  # what the baseline learns under
        # The "process" and "cgroup" members: the two are adjacent in every event.
        self.json = b',"process":' + encode(process) + b',"cgroup":' + encode(cgroup)


class RuleEntry:
    """A rule reference and its JSON."""

    __slots__ = ("json", "ref")

    def __init__(self, ref: RuleRef, encode: Callable[[Any], bytes]) -> None:
        self.ref = ref
        self.json = encode(ref)


class Flow:
    """What events of one (kind, flags, rule bytes, addresses and ports) combination share, encoded.

    ``json`` holds the members from ``"host"`` to ``"remote"`` (ConnectionEvent's order);
    ``pub`` starts the event's NATS PUB command: ``PUB <subject> ``.
    """

    __slots__ = ("destination", "json", "pub", "subject")

    def __init__(self, json: bytes, subject: bytes, destination: str) -> None:
        self.json = json
        self.subject = subject
        self.pub = b"PUB " + subject + b" "
        self.destination = destination  # what the anomaly baseline learns


class Encoded:
    """Events encoded for NATS, in order, as the ``PUB`` commands that publish them.

    ``pieces`` joined are the commands, back to back: the publisher (:mod:`pipeline.bus.publish`)
    sends a batch as one write, and takes it apart again (:meth:`events`) only on its rare
    paths (an event over the server's payload limit, message-id headers). Every event is three
    pieces (the score stage's: ``PUB <subject> ``, ``<size>\\r\\n``, payload with its CRLF; :meth:`add`'s:
    command line, payload, CRLF), none longer than the payload it carries plus its command line:
    the publisher finds the last command from the last three.
    """

    __slots__ = ("count", "payload_bytes", "pieces")

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.count = 0
        self.payload_bytes = 0

    def add(self, subject: bytes, payload: bytes) -> None:
        """Append one event published on ``subject``."""
        self.pieces += (b"PUB %s %d\r\n" % (subject, len(payload)), payload, b"\r\n")
        self.count += 1
        self.payload_bytes += len(payload)

    def extend(self, other: Encoded) -> None:
        """Append every event of ``other``, in order."""
        self.pieces += other.pieces
        self.count += other.count
        self.payload_bytes += other.payload_bytes

    def events(self) -> list[tuple[bytes, bytes]]:
        """(subject, payload) of each event, in order."""
        data = b"".join(self.pieces)
        out = []
        pos = 0
        while pos < len(data):
            eol = data.index(b"\r\n", pos)
            _pub, subject, size = data[pos:eol].split(b" ")
            start = eol + 2
            end = start + int(size)
            out.append((subject, data[start:end]))
            pos = end + 2
        return out

    def __len__(self) -> int:
        return self.count


class _EventId(msgspec.Struct):
    id: str


def event_id(payload: bytes) -> str:
    """The ``id`` member of an encoded event (for the publisher's rare paths)."""
    return msgspec.json.decode(payload, type=_EventId).id


# A connection event's JSON, ConnectionEvent's members in order, for the common cases: no
# folded repeats and a sequence number above 0, with a network namespace (CONNECTION_JSON) or
# without (CONNECTION_JSON_NO_NETNS). The arguments: id prefix, seq, time_ns, the Flow's
# members, the Identity's members, [netns_cookie,] the anomaly, the "cpu" member if not 0 and
# the start of "seq" (CpuText.tail), seq. EventEncoder.payload is the general form.
# Each ends with the CRLF that ends its PUB command (not part of the payload).
CONNECTION_JSON = b'{"type":"connection","id":"%s%d","time_ns":%d,%s%s,"netns_cookie":%d,"anomaly":%s%s%d}\r\n'
CONNECTION_JSON_NO_NETNS = b'{"type":"connection","id":"%s%d","time_ns":%d,%s%s,"anomaly":%s%s%d}\r\n'


class CpuText:
    """The parts of an event that depend on its CPU: the id prefix, and the "cpu" member."""

    __slots__ = ("prefix", "tail")

    def __init__(self, prefix: bytes, cpu: int) -> None:
        self.prefix = prefix  # "<instance>-<cpu>-", escaped for JSON
        self.tail = b',"cpu":%d,"seq":' % cpu if cpu else b',"seq":'  # ConnectionEvent omits a 0


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
        self.flows: dict[tuple[int, int, bytes, bytes], Flow] = {}
        self._heads: dict[tuple[int, int, bytes], tuple[bytes, bytes]] = {}
        self._endpoints: dict[tuple[str, int], bytes] = {}
        self.cpus: dict[int, CpuText] = {}
        self.size_lines: dict[int, bytes] = {}  # the end of a PUB command line: b"<size>\\r\\n"

    def flow(self, key: tuple[int, int, bytes, bytes], rule: RuleEntry) -> Flow:
        """The Flow of ``key`` = CONN fields (KIND, FLAGS, RULE, WHERE), decided by ``rule`` (cache miss)."""
        kind, flags, rule_bytes, where = key
        enums = rule_bytes[:8]
        _family, protocol, direction, *_ = _RULE.unpack(rule_bytes)
        local_addr, remote_addr, local_port, remote_port = _WHERE.unpack(where)
        v4 = bool(flags & abi.F_V4)
        members, subject = self._heads.get((kind, flags, enums)) or self._head(kind, flags, rule_bytes)
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
        json = b"".join((
            members, b',"rule":', rule.json,
            b',"local":', self._endpoint(local, local_port), b',"remote":', self._endpoint(remote, remote_port),
        ))  # fmt: skip
        flow = Flow(json, subject, destination)
        if len(self.flows) > 16384:
            self.flows.clear()
        self.flows[key] = flow
        return flow

    def _head(self, kind: int, flags: int, rule_bytes: bytes) -> tuple[bytes, bytes]:
        """The members from "host" to "known", and the subject, of a (kind, flags, enums) combination."""
        _family, protocol, direction, verdict, mode, *_ = _RULE.unpack(rule_bytes)
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
        value = (members[1:-1], f"{self._subject_prefix}{direction_name}.{verdict_name}".encode())
        if len(self._heads) > 4096:
            self._heads.clear()
        self._heads[(kind, flags, rule_bytes[:8])] = value
        return value

    def _endpoint(self, address: str, port: int) -> bytes:
        key = (address, port)
        raw = self._endpoints.get(key)
        if raw is None:
            raw = self.encode({"address": address, "port": port})
            if len(self._endpoints) > 16384:
                self._endpoints.clear()
            self._endpoints[key] = raw
        return raw

    def cpu(self, cpu: int) -> CpuText:
        """The CpuText of ``cpu`` (cache miss)."""
        text = self.cpus[cpu] = CpuText(self.encode(f"{self.instance}-{cpu}-")[1:-1], cpu)
        return text

    def size_line(self, size: int) -> bytes:
        """The end of the PUB command line of a ``size``-byte payload (cache miss): event sizes
        repeat, and a dict hit costs less than formatting the number."""
        line = b"%d\r\n" % size
        if len(self.size_lines) > 4096:
            self.size_lines.clear()
        self.size_lines[size] = line
        return line

    def payload(
        self, seq: int, time_ns: int, flow: Flow, ident: Identity, netns: int, repeat: int, anomaly: bytes, cpu: int
    ) -> bytes:
        """Any connection event's JSON and the CRLF after it: members with default values left
        out, as msgspec does for ConnectionEvent (the general form of :data:`CONNECTION_JSON`)."""
        text = self.cpus.get(cpu) or self.cpu(cpu)
        start = b'{"type":"connection","id":"%s%d","time_ns":%d,%s%s'
        parts = [start % (text.prefix, seq, time_ns, flow.json, ident.json)]
        if netns:
            parts.append(b',"netns_cookie":%d' % netns)
        if repeat:
            parts.append(b',"repeat":%d' % repeat)
        parts.append(b',"anomaly":%s' % anomaly)
        if cpu:
            parts.append(b',"cpu":%d' % cpu)
        if seq:
            parts.append(b',"seq":%d' % seq)
        parts.append(b"}\r\n")
        return b"".join(parts)
