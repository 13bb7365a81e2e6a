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
from typing import Literal, NamedTuple

import anyio
import structlog
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from loaders import RingBuffer, abi, wait_readable
from pipeline import decode as dec
from pipeline.enrich import CgroupNames, ProcessTable, UserNames, process_of
from pipeline.events import (
    Anomaly,
    Cgroup,
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
)
from pipeline.score import Baseline

log = structlog.get_logger("tool.pipeline")

Batch = list
MAX_BATCH = 1024  # records per batch between stages


@dataclass
class GapTracker:
    """Per-CPU kernel sequence numbers: holes are records lost between kernel and user space.

    Records of one CPU can arrive slightly out of order (a softirq can interleave
    with a program on the same CPU), so a hole is only counted as lost once it
    is older than ``settle`` further records.
    """

    settle: int = 4096
    expected: dict[int, int] = field(default_factory=dict)
    # Per CPU, the open holes as ranges [start, end) in the order they opened, and the
    # late records that filled some of them. A lost record costs nothing until its range
    # settles (a set of every hole, scanned on every record, once cost more than the rest
    # of the pipeline while the ring buffer overflowed).
    opened: dict[int, deque[tuple[int, int]]] = field(default_factory=dict)
    filled: dict[int, set[int]] = field(default_factory=dict)
    lost: int = 0

    def see(self, cpu: int, seq: int) -> None:
        exp = self.expected.get(cpu)
        if seq == exp and cpu not in self.opened:  # the common case: in order, nothing open
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
            self._settle(cpu, ranges, self.expected[cpu] - self.settle)

    def _settle(self, cpu: int, ranges: deque[tuple[int, int]], limit: int) -> None:
        """Count the holes of ``cpu`` older than ``limit`` as lost."""
        while ranges and ranges[0][0] < limit:
            start, end = ranges.popleft()
            stop = min(end, limit)
            self.lost += stop - start - self._take_filled(cpu, start, stop)
            if stop < end:
                ranges.appendleft((stop, end))
                return
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
        """Count every open hole as lost (at shutdown, or when the stream has been quiet)."""
        for cpu, ranges in self.opened.items():
            self.lost += sum(end - start for start, end in ranges) - len(self.filled.get(cpu, ()))
        self.opened.clear()
        self.filled.clear()


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


async def _send_drained(pending: list[bytes], send: ObjectSendStream[Batch[bytes]]) -> None:
    """Send ``pending`` on in batches of at most MAX_BATCH, then empty it.

    Slices and one clear at the end: deleting each batch from the front of a drain of
    tens of thousands of records would move the rest of the list once per batch.
    """
    start = 0
    while start < len(pending):  # re-read: records appended meanwhile are sent too
        batch = pending[start : start + MAX_BATCH]
        start += len(batch)
        await send.send(batch)
    pending.clear()


async def kernel_source(
    rb_map: object,
    send: ObjectSendStream[Batch[bytes]],
    stop: anyio.Event,
    *,
    task_status: anyio.abc.TaskStatus[RingBuffer] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Drain the ring buffer whenever it is readable and send each drain as one batch.

    After ``stop`` is set, drains what is left, then closes ``send`` (which ends the graph).
    """
    pending: list[bytes] = []
    rb = RingBuffer({"events": (rb_map, pending.append)})  # type: ignore[dict-item]
    try:
        task_status.started(rb)
        async with send:
            while not stop.is_set():
                if not pending:
                    with anyio.move_on_after(0.2):
                        await wait_readable(rb)
                    rb.consume()
                # Hand on at most MAX_BATCH records at a time: with bounded streams
                # downstream, a backlog stays in the kernel's ring buffer (where overflow
                # is counted), not in this process's memory.
                await _send_drained(pending, send)
            rb.consume()
            await _send_drained(pending, send)
    finally:
        rb.close()


async def decode_stage(
    recv: ObjectReceiveStream[Batch[bytes]],
    send: ObjectSendStream[Batch[dec.Record]],
    stats: PipelineStats,
) -> None:
    """Raw records -> typed records; counts decode errors and sequence gaps."""
    decode = dec.decode
    gaps = stats.gaps
    async with recv, send:
        async for raw in recv:
            t0 = time.perf_counter()
            out: list[dec.Record] = []
            for data in raw:
                try:
                    rec = decode(data)
                except dec.DecodeError as exc:
                    stats.decode_errors += 1
                    if stats.decode_errors <= 10:
                        log.error("decode_error", error=str(exc), size=len(data))
                    continue
                gaps.see(rec.cpu, rec.seq)
                out.append(rec)
            stats.records += len(raw)
            stats.timed("decode", time.perf_counter() - t0)
            await send.send(out)


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
        self._procs: dict[tuple[int, int, int, int, str], Process] = {}
        # Complete identities by the decoder's (shared) Task: one dict hit per record.
        self._hot: dict[dec.Task, tuple[Process, Cgroup]] = {}

    def process(self, t: dec.Task) -> Process:
        key = (t.tgid, t.exec_id, t.uid, t.gid, t.comm)
        p = self._procs.get(key)
        if p is None:
            p = process_of(self.table, self.users, t.tgid, t.pid, t.exec_id, t.ppid, t.uid, t.gid, t.comm)
            if p.exe is not None:  # only cache complete identities
                if len(self._procs) > 16384:
                    self._procs.clear()
                self._procs[key] = p
        return p

    def enrich(self, rec: dec.Record) -> Enriched:
        if isinstance(rec, dec.ExecRecord):
            t = rec.task
            if rec.kind == abi.EV_EXEC:
                self.table.on_exec(t.tgid, t.exec_id, t.ppid, rec.filename, rec.args, t.comm, rec.exe_ino)
                for key in [k for k in self._procs if k[0] == t.tgid]:
                    del self._procs[key]
                for task in [k for k in self._hot if k.tgid == t.tgid]:
                    del self._hot[task]
            proc = self.process(t)
            if rec.kind == abi.EV_EXIT:
                self.table.on_exit(t.tgid, t.exec_id)
            return Enriched(rec, proc, self.cgroups.get(t.cgroup_id))
        t = rec.task
        hot = self._hot.get(t)
        if hot is not None:
            return Enriched(rec, hot[0], hot[1])
        proc = self.process(t)
        cgroup = self.cgroups.get(t.cgroup_id)
        if proc.exe is not None and cgroup.path is not None:  # only cache complete identities
            if len(self._hot) > 16384:
                self._hot.clear()
            self._hot[t] = (proc, cgroup)
        return Enriched(rec, proc, cgroup)


async def enrich_stage(
    recv: ObjectReceiveStream[Batch[dec.Record]],
    send: ObjectSendStream[Batch[Enriched]],
    enricher: Enricher,
    stats: PipelineStats,
) -> None:
    """Attach process and cgroup identity."""
    async with recv, send:
        async for batch in recv:
            t0 = time.perf_counter()
            out = [enricher.enrich(r) for r in batch]
            stats.timed("enrich", time.perf_counter() - t0)
            await send.send(out)


RuleDescriber = Callable[[int, int], tuple[str | None, str | None, str]]


def _default_explanation(rec: dec.ConnRecord) -> str:
    mode = dec.MODE_NAMES.get(rec.mode, "?")
    direction = dec.DIRECTION_NAMES.get(rec.direction, "?")
    action = {abi.ACT_ALLOW: "allow", abi.ACT_ALERT: "alert", abi.ACT_DENY: "deny"}.get(rec.action, "allow")
    return f"no rule matched; the {mode}-mode default for {direction} connections is {action}"


async def match_stage(
    recv: ObjectReceiveStream[Batch[Enriched]],
    send: ObjectSendStream[Batch[Enriched]],
    describe: RuleDescriber,
    stats: PipelineStats,
) -> None:
    """Name the policy entry that decided each connection and explain it in one line."""
    cache: dict[tuple[int, int], RuleRef] = {}
    defaults: dict[tuple[int, int, int], RuleRef] = {}  # (mode, direction, action) -> "no rule matched"
    async with recv, send:
        async for batch in recv:
            t0 = time.perf_counter()
            for item in batch:
                rec = item.rec
                if not isinstance(rec, dec.ConnRecord):
                    continue
                if rec.rule_id == 0:
                    dkey = (rec.mode, rec.direction, rec.action)
                    default = defaults.get(dkey)
                    if default is None:
                        default = defaults[dkey] = RuleRef(id=0, explanation=_default_explanation(rec))
                    item.rule = default
                    continue
                key = (rec.rule_id, rec.policy_gen)
                ref = cache.get(key)
                if ref is None:
                    name, source, explanation = describe(rec.rule_id, rec.policy_gen)
                    ref = RuleRef(id=rec.rule_id, name=name, policy=source, explanation=explanation)
                    if len(cache) > 65536:
                        cache.clear()
                    cache[key] = ref
                item.rule = ref
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
    recv: ObjectReceiveStream[Batch[Enriched]],
    send: ObjectSendStream[Event | list[Event]],
    baseline: Baseline,
    builder: EventBuilder,
    stats: PipelineStats,
) -> None:
    """Score each connection against its executable's baseline and emit the final events."""
    async with recv, send:
        observe = baseline.observe
        connection = builder.connection
        conn_record = dec.ConnRecord
        async for batch in recv:
            t0 = time.perf_counter()
            now = time.time()  # one wall-clock reading per batch for the baseline
            events: list[Event] = []
            append = events.append
            conns = 0
            for item in batch:
                rec = item.rec
                if type(rec) is conn_record:
                    process = item.process
                    exe = process.exe or f"comm:{process.comm}"
                    append(connection(item, observe(exe, destination_key(rec), now)))
                    conns += 1
                else:
                    append(builder.process(item))
                    stats.process_events += 1
            stats.connection_events += conns
            stats.timed("score", time.perf_counter() - t0)
            await send.send(events)
