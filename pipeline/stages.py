"""The stage graph's stages: kernel source -> decode -> enrich -> match -> score -> publish.

Stages talk only through bounded anyio memory streams and pass batches (lists)
to keep per-event overhead low. Every stage applies back-pressure; the only
place where an event can be shed is the kernel's ring buffer, which counts
every record it could not queue.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import anyio
import msgspec
import structlog
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from loaders import abi
from loaders.maps import Map
from loaders.ringbuf import MMAP_READER_SAFE, RingBuffer, RingReader
from pipeline import decode as dec
from pipeline import hotpath as hot
from pipeline.enrich import CgroupNames, ProcessTable, UserNames, process_of
from pipeline.events import (
    Anomaly,
    ConnectionEvent,
    ConnectionKind,
    Direction,
    Endpoint,
    Event,
    Mode,
    Process,
    ProcessEvent,
    RuleRef,
    Verdict,
    subject_for,
)
from pipeline.score import Baseline

log = structlog.get_logger("tool.pipeline")

MAX_BATCH = 1024  # records per batch between stages
TRICKLE = 64  # a drain of fewer records than this waits GATHER_S before the next
GATHER_S = 0.002
NO_HOLE = 1 << 64  # above every kernel sequence number (u64)


@dataclass
class GapTracker:
    """Per-CPU kernel sequence numbers: holes are records lost between kernel and user space.

    Records of one CPU can arrive slightly out of order (a softirq can interleave
    with a program on the same CPU), so a hole is only counted as lost once all of it
    is older than ``settle`` further sequence numbers; a late record that arrives
    before then is not lost. A jump over more than ``settle`` is counted at once.
    """

    settle: int = 4096
    expected: dict[int, int] = field(default_factory=dict)
    # Per CPU, the sequence number from which in-order records go through see() again: the
    # oldest open hole settles with it (NO_HOLE while none is open). Until then the hot path
    # (hotpath.drain) takes in-order records without a call, also while holes are open:
    # under overload nearly every drain opens one, and a call per record for the next
    # ``settle`` records once cost the agent more than enrich and match together.
    due: dict[int, int] = field(default_factory=dict)
    # Per CPU, the open holes as ranges [start, end) in the order they opened, and the
    # late records that filled some of them. A lost record costs nothing until its range
    # settles (a set of every hole, scanned on every record, once cost more than the rest
    # of the pipeline while the ring buffer overflowed).
    opened: dict[int, deque[tuple[int, int]]] = field(default_factory=dict)
    filled: dict[int, set[int]] = field(default_factory=dict)
    lost: int = 0

    def see(self, cpu: int, seq: int) -> None:
        exp = self.expected.get(cpu)
        if seq == exp and seq < self.due[cpu]:  # the common case: in order, nothing due
            self.expected[cpu] = seq + 1
            return
        if exp is None or seq == exp:
            self.expected[cpu] = seq + 1
        elif seq > exp:
            if seq - exp > self.settle:
                self.lost += seq - exp
            else:
                self.opened.setdefault(cpu, deque()).append((exp, seq))
            self.expected[cpu] = seq + 1
        else:
            ranges = self.opened.get(cpu)
            if ranges and any(start <= seq < end for start, end in ranges):  # rare: a late record
                self.filled.setdefault(cpu, set()).add(seq)
        ranges = self.opened.get(cpu)
        if ranges:
            self._settle(cpu, ranges, self.expected[cpu] - self.settle)  # pops from ranges itself
        # The record that makes expected reach end + settle settles the oldest hole.
        self.due[cpu] = ranges[0][1] + self.settle - 1 if ranges else NO_HOLE

    def _settle(self, cpu: int, ranges: deque[tuple[int, int]], limit: int) -> None:
        """Count the holes of ``cpu`` that end at or before ``limit`` as lost, each whole.

        Whole holes, not the part of one older than ``limit``: under overload a hole is
        thousands of records wide, and settling it a record at a time took every record of the
        CPU through the slow path until it was gone.
        """
        while ranges and ranges[0][1] <= limit:
            start, end = ranges.popleft()
            self.lost += end - start - self._take_filled(cpu, start, end)
        if not ranges:
            del self.opened[cpu]
            self.filled.pop(cpu, None)

    def _take_filled(self, cpu: int, start: int, stop: int) -> int:
        filled = self.filled.get(cpu)
        if not filled:
            return 0
        late = [seq for seq in filled if start <= seq < stop]
        filled.difference_update(late)
        return len(late)

    def settle_all(self) -> None:
        """Count every open hole as lost (at shutdown, once the ring is drained)."""
        for cpu, ranges in self.opened.items():
            self.lost += sum(end - start for start, end in ranges) - len(self.filled.get(cpu, ()))
        self.opened.clear()
        self.filled.clear()
        for cpu in self.due:
            self.due[cpu] = NO_HOLE


@dataclass
class PipelineStats:
    """Counters every stage updates; read by the API, the loss report and metrics."""

    records: int = 0
    decode_errors: int = 0
    connection_events: int = 0
    process_events: int = 0
    gaps: GapTracker = field(default_factory=GapTracker)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # Called with (stage, seconds per batch), e.g. the OpenTelemetry stage-latency histogram.
    observer: Callable[[str, float], None] | None = None

    def timed(self, stage: str, seconds: float) -> None:
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
        if self.observer is not None:
            self.observer(stage, seconds)


class Batch:
    """Records on their way through the graph, with what each stage added, one entry per record.

    ``records`` holds CONN tuples (:mod:`pipeline.hotpath`) for connection records and
    :class:`pipeline.decode.ExecRecord` for process records, in kernel order.
    """

    __slots__ = ("idents", "records", "rules")

    def __init__(self, records: list[hot.Record]) -> None:
        self.records = records
        self.idents: list[Any] = []  # Identity, or Enriched for a process record
        self.rules: list[hot.RuleEntry | None] = []


class _MmapSource:
    """Records read in place from the ring's shared memory (x86)."""

    def __init__(self, rb_map: Map, stats: PipelineStats, errors: hot.DecodeErrors) -> None:
        self._reader = RingReader(rb_map)
        self._gaps = stats.gaps
        self._errors = errors

    def fileno(self) -> int:
        return self._reader.fileno()

    def take(self, limit: int) -> list[hot.Record]:
        g = self._gaps
        return hot.drain(self._reader, g.see, g.expected, g.due, self._errors, limit)

    def waiting(self) -> bool:
        """Records (complete or still being written) wait in the ring."""
        consumer, producer = self._reader.window()
        return consumer < producer

    def close(self) -> None:
        self._reader.close()


class _LibbpfSource:
    """Records copied out by libbpf's consumer, whose loads are ordered on every CPU."""

    def __init__(self, rb_map: Map, stats: PipelineStats, errors: hot.DecodeErrors) -> None:
        self._pending: list[bytes] = []
        self._rb = RingBuffer({"events": (rb_map, self._pending.append)})
        self._gaps = stats.gaps
        self._errors = errors

    def fileno(self) -> int:
        return self._rb.fileno()

    def take(self, limit: int) -> list[hot.Record]:
        if not self._pending:
            self._rb.consume()
        raws = self._pending[:limit]
        del self._pending[:limit]
        g = self._gaps
        return hot.decode_records(raws, g.see, g.expected, g.due, self._errors)

    def waiting(self) -> bool:
        """Records copied out and not yet taken (libbpf consumes only complete ones)."""
        return bool(self._pending)

    def close(self) -> None:
        self._rb.close()


async def ring_stage(
    rb_map: Map,
    send: ObjectSendStream[Batch],
    stop: anyio.Event,
    stats: PipelineStats,
    *,
    reader: Literal["auto", "mmap", "libbpf"] = "auto",
    drained: anyio.Event | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Source and decode: take records from the ring buffer whenever it is readable.

    ``reader``: "mmap" reads records in place from the ring's shared memory (the fast path,
    x86 only: see :data:`loaders.ringbuf.MMAP_READER_SAFE`); "libbpf" copies each out through
    libbpf's consumer; "auto" picks mmap where it is safe.

    Hands on at most MAX_BATCH records at a time: with bounded streams downstream, a backlog
    stays in the kernel's ring buffer (where overflow is counted), not in this process's memory.
    After ``stop`` is set, drains what is left, then closes ``send`` (which ends the graph) and
    sets ``drained``: from then on every record the stage will ever take has been counted,
    gaps included, so a final loss report waits for it.
    """
    errors = hot.DecodeErrors(log.error)
    mmap = reader == "mmap" or (reader == "auto" and MMAP_READER_SAFE)
    source = (_MmapSource if mmap else _LibbpfSource)(rb_map, stats, errors)
    fd = source.fileno()

    def take() -> list[hot.Record]:
        t0 = time.perf_counter()
        records = source.take(MAX_BATCH)
        stats.records += len(records)
        stats.decode_errors = errors.count
        stats.timed("decode", time.perf_counter() - t0)
        return records

    try:
        task_status.started()
        async with send:
            while not stop.is_set():
                records = take()
                if records:
                    await send.send(Batch(records))
                    if len(records) < TRICKLE:
                        # A trickle: let a few milliseconds of records gather rather than wake
                        # the whole graph for every few records (at a steady 20k events/s this
                        # cut the agent's CPU from 76-83% to 63%). A busy ring is read back to back.
                        await anyio.sleep(GATHER_S)
                    continue
                with anyio.move_on_after(0.2):
                    await anyio.wait_readable(fd)
                if source.waiting():  # readable, but the next record is still being written
                    await anyio.sleep(GATHER_S)
            # Drain what the ring holds now, bounded by its size: the sensors stay attached
            # until the graph has ended, and a busy host never stops producing.
            for _ in range(rb_map.max_entries // hot.CONN.size // MAX_BATCH + 2):
                records = take()
                if records:
                    await send.send(Batch(records))
                elif source.waiting():  # a record still being written
                    await anyio.sleep(GATHER_S)
                else:
                    break
    finally:
        source.close()
        if drained is not None:
            drained.set()


@dataclass(slots=True)
class Enriched:
    """A record on its way through enrich -> match -> score."""

    rec: dec.Record
    process: Process
    cgroup: object  # pipeline.events.Cgroup
    rule: RuleRef | None = None


class Enricher:
    """Process and cgroup identity for records, with small caches."""

    def __init__(self, cgroup_root: str, table: ProcessTable | None = None) -> None:
        self.table = table or ProcessTable()
        self.users = UserNames()
        self.cgroups = CgroupNames(cgroup_root)
        self._encode = msgspec.json.Encoder().encode
        self._procs: dict[tuple[int, int, int, int, int, int, str], Process] = {}
        # Complete identities by the kernel's raw task bytes: one dict hit per record.
        self.hot: dict[bytes, hot.Identity] = {}
        self._hot_by_tgid: dict[int, list[bytes]] = {}

    def process(self, t: dec.Task) -> Process:
        key = (t.tgid, t.pid, t.ppid, t.exec_id, t.uid, t.gid, t.comm)
        p = self._procs.get(key)
        if p is None:
            p = process_of(self.table, self.users, t.tgid, t.pid, t.exec_id, t.ppid, t.uid, t.gid, t.comm)
            if p.exe is not None:  # only cache complete identities
                if len(self._procs) > 16384:
                    self._procs.clear()
                self._procs[key] = p
        return p

    def identity(self, raw_task: bytes) -> hot.Identity:
        """The identity behind a connection record's task bytes (cache miss)."""
        t = hot.task_of(raw_task)
        ident = hot.Identity(self.process(t), self.cgroups.get(t.cgroup_id), self._encode)
        # Only cache complete identities: a missing exe or cgroup path may still resolve later
        # (cgroup id 0 never will: the kernel had no cgroup to report).
        if ident.process.exe is not None and (ident.cgroup.path is not None or t.cgroup_id == 0):
            if len(self.hot) > 16384:
                self.hot.clear()
                self._hot_by_tgid.clear()
            self.hot[raw_task] = ident
            self._hot_by_tgid.setdefault(t.tgid, []).append(raw_task)
        return ident

    def enrich(self, rec: dec.Record) -> Enriched:
        """The reference path: one decoded record (see pipeline.decode) with its identity."""
        if isinstance(rec, dec.ExecRecord):
            return self.process_record(rec)
        t = rec.task
        return Enriched(rec, self.process(t), self.cgroups.get(t.cgroup_id))

    def process_record(self, rec: dec.ExecRecord) -> Enriched:
        """Learn from an exec or exit record, and name its process."""
        t = rec.task
        if rec.kind == abi.EV_EXEC:
            self.table.on_exec(t.tgid, t.exec_id, t.ppid, rec.filename, rec.args, t.comm, rec.exe_ino)
            for key in [k for k in self._procs if k[0] == t.tgid]:
                del self._procs[key]
            for raw in self._hot_by_tgid.pop(t.tgid, ()):
                self.hot.pop(raw, None)
        proc = self.process(t)
        if rec.kind == abi.EV_EXIT:
            self.table.on_exit(t.tgid, t.exec_id)
        return Enriched(rec, proc, self.cgroups.get(t.cgroup_id))


async def enrich_stage(
    recv: ObjectReceiveStream[Batch],
    send: ObjectSendStream[Batch],
    enricher: Enricher,
    stats: PipelineStats,
) -> None:
    """Attach process and cgroup identity (process records update the process table first)."""
    task = hot.TASK
    async with recv, send:
        async for batch in recv:
            t0 = time.perf_counter()
            # In kernel order: a process record updates the table (and the identity cache) before
            # the records after it are looked up. A comprehension: no append call per record.
            cached, identity, process_record = enricher.hot.get, enricher.identity, enricher.process_record
            batch.idents = [
                (cached(rec[task]) or identity(rec[task])) if type(rec) is tuple else process_record(rec)  # type: ignore[arg-type]
                for rec in batch.records
            ]
            stats.timed("enrich", time.perf_counter() - t0)
            await send.send(batch)


RuleDescriber = Callable[[int, int], tuple[str | None, str | None, str]]


def _default_explanation(rec: dec.ConnRecord) -> str:
    mode = dec.MODE_NAMES.get(rec.mode, "?")
    direction = dec.DIRECTION_NAMES.get(rec.direction, "?")
    action = {abi.ACT_ALLOW: "allow", abi.ACT_ALERT: "alert", abi.ACT_DENY: "deny"}.get(rec.action, "allow")
    return f"no rule matched; the {mode}-mode default for {direction} connections is {action}"


async def match_stage(
    recv: ObjectReceiveStream[Batch],
    send: ObjectSendStream[Batch],
    describe: RuleDescriber,
    stats: PipelineStats,
) -> None:
    """Name the policy entry that decided each connection and explain it in one line."""
    encode = msgspec.json.Encoder().encode
    # The record's rule bytes (the enums, rule id and generation) -> its reference. The default
    # that decided depends only on the enums, a rule only on (id, generation): both are in them.
    cache: dict[bytes, hot.RuleEntry] = {}
    i_rule = hot.RULE

    def miss(rec: hot.ConnTuple) -> hot.RuleEntry:
        rule_id, generation = hot.rule_of(rec)
        if rule_id == 0:
            ref = RuleRef(id=0, explanation=_default_explanation(hot.conn_record(rec)))
        else:
            name, source, explanation = describe(rule_id, generation)
            ref = RuleRef(id=rule_id, name=name, policy=source, explanation=explanation)
        if len(cache) > 65536:
            cache.clear()
        entry = cache[rec[i_rule]] = hot.RuleEntry(ref, encode)
        return entry

    get = cache.get
    async with recv, send:
        async for batch in recv:
            t0 = time.perf_counter()
            batch.rules = [(get(rec[i_rule]) or miss(rec)) if type(rec) is tuple else None for rec in batch.records]
            stats.timed("match", time.perf_counter() - t0)
            await send.send(batch)


Family = Literal["ipv4", "ipv6", "packet"]


class _ConnTexts(NamedTuple):
    """The text fields of a connection event that depend only on the kernel's enums and flags."""

    kind: ConnectionKind
    direction: Direction
    protocol: str
    family: Family
    verdict: Verdict
    mode: Mode
    known: bool
    v4: bool


class EventBuilder:
    """Turns enriched records into the published event types."""

    def __init__(self, host: str, instance: str, boot_offset_ns: int) -> None:
        self.host = host
        self.instance = instance
        self.boot_offset_ns = boot_offset_ns  # wall clock minus CLOCK_BOOTTIME
        # Per-event work is kept to dict hits: the id prefix per CPU, the text fields per
        # combination of kernel enums, endpoints and rule references are shared.
        self._id_prefix: dict[int, str] = {}
        self._texts: dict[tuple[int, int, int, int, int, int], _ConnTexts] = {}
        self._endpoints: dict[tuple[str, int], Endpoint] = {}
        self._bare_rules: dict[int, RuleRef] = {}

    def _id(self, cpu: int, seq: int) -> str:
        prefix = self._id_prefix.get(cpu)
        if prefix is None:
            prefix = self._id_prefix[cpu] = f"{self.instance}-{cpu}-"
        return f"{prefix}{seq}"

    def _conn_texts(self, rec: dec.ConnRecord) -> _ConnTexts:
        key = (rec.kind, rec.direction, rec.protocol, rec.flags, rec.verdict, rec.mode)
        texts = self._texts.get(key)
        if texts is None:
            v4 = bool(rec.flags & abi.F_V4)
            texts = _ConnTexts(
                dec.KIND_NAMES[rec.kind],  # type: ignore[arg-type]
                dec.DIRECTION_NAMES.get(rec.direction, "egress"),  # type: ignore[arg-type]
                dec.PROTOCOL_NAMES.get(rec.protocol, str(rec.protocol)),
                "packet" if rec.flags & abi.F_PACKET else ("ipv4" if v4 else "ipv6"),
                dec.VERDICT_NAMES.get(rec.verdict, "allowed"),  # type: ignore[arg-type]
                dec.MODE_NAMES.get(rec.mode, "detect"),  # type: ignore[arg-type]
                not rec.flags & abi.F_UNKNOWN,
                v4,
            )
            if len(self._texts) > 4096:
                self._texts.clear()
            self._texts[key] = texts
        return texts

    def _endpoint(self, address: str, port: int) -> Endpoint:
        key = (address, port)
        ep = self._endpoints.get(key)
        if ep is None:
            if len(self._endpoints) > 65536:
                self._endpoints.clear()
            ep = self._endpoints[key] = Endpoint(address, port)
        return ep

    def connection(self, item: Enriched, anomaly: Anomaly | None) -> ConnectionEvent:
        rec = item.rec
        assert isinstance(rec, dec.ConnRecord)
        texts = self._texts.get((rec.kind, rec.direction, rec.protocol, rec.flags, rec.verdict, rec.mode))
        if texts is None:
            texts = self._conn_texts(rec)
        local = rec.local_addr
        if texts.v4 and local == "::":
            local = "0.0.0.0"
        rule = item.rule
        if rule is None:
            rule = self._bare_rules.get(rec.rule_id)
            if rule is None:
                if len(self._bare_rules) > 65536:
                    self._bare_rules.clear()
                rule = self._bare_rules[rec.rule_id] = RuleRef(id=rec.rule_id)
        endpoints = self._endpoints
        local_ep = endpoints.get((local, rec.local_port)) or self._endpoint(local, rec.local_port)
        remote_ep = endpoints.get((rec.remote_addr, rec.remote_port)) or self._endpoint(
            rec.remote_addr, rec.remote_port
        )
        prefix = self._id_prefix.get(rec.cpu)
        event_id = f"{prefix}{rec.seq}" if prefix is not None else self._id(rec.cpu, rec.seq)
        # Positional, in field order (msgspec checks the count; the tests check the JSON).
        return ConnectionEvent(
            event_id,
            rec.ts_ns + self.boot_offset_ns,
            self.host,
            texts.kind,
            texts.direction,
            texts.protocol,
            texts.family,
            texts.verdict,
            texts.mode,
            texts.known,
            rule,
            local_ep,
            remote_ep,
            item.process,
            item.cgroup,  # type: ignore[arg-type]
            rec.netns_cookie,
            rec.repeat,
            anomaly,
            rec.cpu,
            rec.seq,
        )

    def process(self, item: Enriched) -> ProcessEvent:
        rec = item.rec
        assert isinstance(rec, dec.ExecRecord)
        return ProcessEvent(
            id=self._id(rec.cpu, rec.seq),
            time_ns=rec.ts_ns + self.boot_offset_ns,
            host=self.host,
            kind="exec" if rec.kind == abi.EV_EXEC else "exit",
            process=item.process,
            cgroup=item.cgroup,  # type: ignore[arg-type]
            exit_code=exit_code_of(rec.exit_code) if rec.kind == abi.EV_EXIT else None,
            cpu=rec.cpu,
            seq=rec.seq,
        )


def exit_code_of(status: int) -> int:
    """A kernel wait status as a shell would say it: the exit code, or minus the signal that ended it."""
    signal = status & 0x7F
    return -signal if signal else (status >> 8) & 0xFF


def destination_key(rec: dec.ConnRecord) -> str:
    """What the baseline remembers for a connection."""
    proto = dec.PROTOCOL_NAMES.get(rec.protocol) or str(rec.protocol)
    if rec.direction == abi.DIR_EGRESS:
        return f"{rec.remote_addr}:{rec.remote_port}/{proto}"
    if rec.direction == abi.DIR_INGRESS:
        return f"from {rec.remote_addr} to port {rec.local_port}/{proto}"
    if rec.direction == abi.DIR_LISTEN:
        return f"listen {rec.local_addr}:{rec.local_port}/{proto}"
    return f"raw socket protocol {rec.remote_port}"


async def score_stage(
    recv: ObjectReceiveStream[Batch],
    send: ObjectSendStream[Event | list[Event] | hot.Encoded],
    baseline: Baseline,
    encoder: hot.EventEncoder,
    builder: EventBuilder,
    stats: PipelineStats,
) -> None:
    """Score each connection against its executable's baseline and encode the final events.

    Connection events are written straight into their NATS ``PUB`` commands from cached pieces
    (:mod:`pipeline.hotpath`); the publisher sends a batch of them as one write.
    """
    observe = baseline.observe_json
    encode = encoder.encode
    flows, cpus, size_lines = encoder.flows, encoder.cpus, encoder.size_lines
    offset = encoder.boot_offset_ns
    template, template_no_netns = hot.CONNECTION_JSON, hot.CONNECTION_JSON_NO_NETNS
    # Field indices as locals (the loop body runs once per event).
    i_kind, i_flags, i_rule, i_where = hot.KIND, hot.FLAGS, hot.RULE, hot.WHERE
    i_cpu, i_seq, i_ts = hot.CPU, hot.SEQ, hot.TS_NS
    i_netns, i_repeat = hot.NETNS, hot.REPEAT
    async with recv, send:
        async for batch in recv:
            t0 = time.perf_counter()
            now = time.time()  # one wall-clock reading per batch for the baseline
            out = hot.Encoded()
            extend = out.pieces.extend
            size = conns = 0
            for rec, ident, rule in zip(batch.records, batch.idents, batch.rules, strict=True):
                if type(rec) is not tuple:
                    event = builder.process(ident)
                    out.add(subject_for(event).encode(), encode(event))
                    stats.process_events += 1
                    continue
                key = (rec[i_kind], rec[i_flags], rec[i_rule], rec[i_where])
                flow = flows.get(key) or encoder.flow(key, rule)  # type: ignore[arg-type]
                anomaly = observe(ident.exe_key, flow.destination, now)
                cpu, seq, netns, repeat = rec[i_cpu], rec[i_seq], rec[i_netns], rec[i_repeat]
                text = cpus.get(cpu) or encoder.cpu(cpu)
                # The payload and the CRLF after it; the common cases in one format each.
                if seq and not repeat and netns:
                    payload = template % (
                        text.prefix, seq, rec[i_ts] + offset, flow.json, ident.json, netns, anomaly, text.tail, seq
                    )  # fmt: skip
                elif seq and not repeat:
                    payload = template_no_netns % (
                        text.prefix, seq, rec[i_ts] + offset, flow.json, ident.json, anomaly, text.tail, seq
                    )  # fmt: skip
                else:
                    payload = encoder.payload(seq, rec[i_ts] + offset, flow, ident, netns, repeat, anomaly, cpu)
                n = len(payload) - 2
                extend((flow.pub, size_lines.get(n) or encoder.size_line(n), payload))  # "PUB <subject> <n>\r\n..."
                size += n
                conns += 1
            out.count += conns
            out.payload_bytes += size
            stats.connection_events += conns
            stats.timed("score", time.perf_counter() - t0)
            await send.send(out)
