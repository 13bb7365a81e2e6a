"""The hot path publishes exactly what the typed reference path would, byte for byte.

The agent encodes connection events from raw kernel records with pre-encoded pieces
(pipeline.hotpath); the typed path (decode -> Enricher -> EventBuilder -> msgspec) is the
contract's reference. Random records go through both, through the real stage functions.
"""

from __future__ import annotations

import os
from typing import Any

import anyio
import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loaders import abi
from loaders.cgroup import cgroup2_root
from pipeline import decode as dec
from pipeline import hotpath as hot
from pipeline.bus.publish import _is_last_command, _joined, _last_command
from pipeline.events import ConnectionEvent, RuleRef, subject_for
from pipeline.score import Baseline
from pipeline.stages import (
    Batch,
    Enriched,
    Enricher,
    EventBuilder,
    PipelineStats,
    _default_explanation,
    destination_key,
    enrich_stage,
    match_stage,
    score_stage,
)

CGROUP_ROOT = cgroup2_root()
PID = os.getpid()
_CLK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def _own_task() -> tuple[int, int, int]:
    """This process's exec id (start time) and cgroup id, as the kernel would report them."""
    with open(f"/proc/{PID}/stat") as f:
        start = int(f.read().rsplit(")", 1)[1].split()[19]) * _CLK_NS
    return PID, start, 0


def describe(rule_id: int, generation: int) -> tuple[str | None, str | None, str]:
    return f"rule-{rule_id}", f"/etc/tool/policy-{generation}.yaml", f"rule {rule_id} of generation {generation}"


V4 = st.builds(lambda a: b"\0" * 10 + b"\xff\xff" + a, st.binary(min_size=4, max_size=4))
V6 = st.binary(min_size=16, max_size=16)
ADDR = st.one_of(V4, V6, st.just(b"\0" * 16), st.sampled_from([b"\0" * 10 + b"\xff\xff\x7f\0\0\x01"]))
RECORD = st.fixed_dictionaries({
    "kind": st.integers(abi.EV_CONNECT, abi.EV_SOCKET),
    "flags": st.sets(st.sampled_from([abi.F_V4, abi.F_UNKNOWN, abi.F_PACKET, abi.F_NO_TASK])).map(sum),
    "seq": st.integers(0, 1 << 40),
    "cpu": st.integers(0, 3),
    "own_task": st.booleans(),
    "pid": st.integers(1, 4_000_000),
    "uid": st.sampled_from([0, 1, 65534, 4242]),
    "netns": st.sampled_from([0, 4026531840, 99]),
    "family": st.sampled_from([2, 10, 17]),
    "protocol": st.sampled_from([6, 17, 1, 58, 255, 132, 200]),
    "direction": st.sampled_from([abi.DIR_EGRESS, abi.DIR_INGRESS, abi.DIR_LISTEN, abi.DIR_RAW]),
    "verdict": st.sampled_from([abi.VERDICT_ALLOW, abi.VERDICT_BLOCK, abi.VERDICT_WOULD_BLOCK, abi.VERDICT_ALERT]),
    "mode": st.sampled_from([abi.MODE_DETECT, abi.MODE_PREVENT]),
    "action": st.sampled_from([abi.ACT_ALLOW, abi.ACT_ALERT, abi.ACT_DENY]),
    "rule_id": st.one_of(st.just(0), st.integers(1, 5)),
    "gen": st.integers(1, 3),
    "local": ADDR,
    "remote": ADDR,
    "lport": st.sampled_from([0, 22, 443, 40000]),
    "rport": st.sampled_from([0, 53, 443, 8080]),
    "repeat": st.sampled_from([0, 0, 7]),
    "comm": st.sampled_from([b"python3", b"curl", b"\xff\xfe bad utf8"]),
})  # fmt: skip


def pack(r: dict[str, Any], ts: int) -> bytes:
    pid, exec_id, cgroup_id = _own_task() if r["own_task"] else (r["pid"], 123456789, 0)
    return abi.CONN_RECORD.pack(
        r["kind"], abi.CONN_RECORD.size, r["flags"], ts, r["seq"], r["cpu"], abi.ABI_VERSION,
        pid, pid, 1, r["uid"], r["uid"], 0, exec_id, cgroup_id, r["comm"].ljust(16, b"\0")[:16],
        r["netns"], 77, r["family"], r["protocol"], r["direction"], r["verdict"], r["mode"], r["action"], 1,
        r["rule_id"], r["gen"], r["local"], r["remote"], r["lport"], r["rport"], r["repeat"],
    )  # fmt: skip


async def hot_path(records: list[bytes], baseline: Baseline) -> hot.Encoded:
    enricher = Enricher(CGROUP_ROOT)
    stats = PipelineStats()
    s1, r1 = anyio.create_memory_object_stream[Batch](1)
    s2, r2 = anyio.create_memory_object_stream[Batch](1)
    s3, r3 = anyio.create_memory_object_stream[Batch](1)
    s4, r4 = anyio.create_memory_object_stream[Any](1)
    out: list[hot.Encoded] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(enrich_stage, r1, s2, enricher, stats)
        tg.start_soon(match_stage, r2, s3, describe, stats)
        tg.start_soon(
            score_stage, r3, s4, baseline, hot.EventEncoder("host-1", "inst", 5), EventBuilder("host-1", "inst", 5),
            stats,
        )  # fmt: skip
        async with s1:
            await s1.send(Batch([hot.conn_tuple(r) for r in records]))
        async with r4:
            async for item in r4:
                out.append(item)
    assert len(out) == 1
    return out[0]


def reference(records: list[bytes], baseline: Baseline) -> list[tuple[bytes, bytes, str]]:
    enricher = Enricher(CGROUP_ROOT)
    builder = EventBuilder("host-1", "inst", 5)
    out = []
    for raw in records:
        rec = dec.decode(raw)
        assert isinstance(rec, dec.ConnRecord)
        item = enricher.enrich(rec)
        if rec.rule_id:
            name, source, explanation = describe(rec.rule_id, rec.policy_gen)
            item.rule = RuleRef(id=rec.rule_id, name=name, policy=source, explanation=explanation)
        else:
            item.rule = RuleRef(id=0, explanation=_default_explanation(rec))
        process = item.process
        anomaly = baseline.observe(process.exe or f"comm:{process.comm}", destination_key(rec), 1.0)
        event = builder.connection(Enriched(rec, item.process, item.cgroup, item.rule), anomaly)
        out.append((subject_for(event).encode(), msgspec.json.encode(event), event.id))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(RECORD, min_size=1, max_size=40))
def test_hot_path_bytes_equal_the_typed_events(records: list[dict[str, Any]]) -> None:
    raws = [pack(r, 1000 + i) for i, r in enumerate(records)]
    got = anyio.run(hot_path, raws, Baseline(None, warmup_observations=3))
    want = reference(raws, Baseline(None, warmup_observations=3))
    assert [(subject, payload, hot.event_id(payload)) for subject, payload in got.events()] == want
    assert b"".join(got.pieces) == b"".join(b"PUB %s %d\r\n%s\r\n" % (s, len(p), p) for s, p, _ in want)
    assert len(got) == len(want)
    assert got.payload_bytes == sum(len(p) for _, p, _ in want)
    for _, payload in got.events():  # consumers decode it as the published type, and nothing is lost
        assert msgspec.json.encode(msgspec.json.decode(payload, type=ConnectionEvent)) == payload
    # The publisher's hint of where the batch's last command starts holds, for the score stage's
    # batches and for Encoded.add's, alone and together: it is then used, not parsed for.
    added = hot.Encoded()
    for subject, payload, _ in want:
        added.add(subject, payload)
    both = hot.Encoded()
    both.extend(got)
    both.extend(added)
    for batch in (got, added, both):
        frames = _joined(batch)
        assert frames.last >= 0 and _is_last_command(frames.data, frames.last)
        assert frames.last == _last_command(frames.data)


def test_conn_tuple_matches_the_reference_decoder() -> None:
    raw = pack(
        {"kind": abi.EV_ACCEPT, "flags": abi.F_V4, "seq": 9, "cpu": 1, "own_task": True, "pid": 1, "uid": 0,
         "netns": 5, "family": 2, "protocol": 6, "direction": abi.DIR_INGRESS, "verdict": abi.VERDICT_ALLOW,
         "mode": abi.MODE_PREVENT, "action": abi.ACT_ALLOW, "rule_id": 3, "gen": 2,
         "local": b"\0" * 10 + b"\xff\xff\x0a\0\0\x01", "remote": bytes(range(16)), "lport": 22, "rport": 40000,
         "repeat": 2, "comm": b"sshd"}, 42,
    )  # fmt: skip
    assert hot.conn_record(hot.conn_tuple(raw)) == dec.decode(raw)._replace(sock_cookie=0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["/bin/a", "/bin/b"]), st.sampled_from(["x:1", "y:2", "z:3"])), max_size=300))
def test_observe_json_is_observe_encoded(seq: list[tuple[str, str]]) -> None:
    fast = Baseline(None, warmup_observations=4, max_destinations=2)
    slow = Baseline(None, warmup_observations=4, max_destinations=2)
    for i, (exe, dest) in enumerate(seq):
        assert bytes(fast.observe_json(exe, dest, float(i))) == msgspec.json.encode(slow.observe(exe, dest, float(i)))
    assert msgspec.json.encode(fast.profiles) == msgspec.json.encode(slow.profiles)


def _conn(cpu: int, seq: int) -> bytes:
    r = {
        "kind": abi.EV_CONNECT, "flags": abi.F_V4, "seq": seq, "cpu": cpu, "own_task": False, "pid": 1,
        "uid": 0, "netns": 0, "family": 2, "protocol": 6, "direction": abi.DIR_EGRESS,
        "verdict": abi.VERDICT_ALLOW, "mode": abi.MODE_DETECT, "action": abi.ACT_ALLOW, "rule_id": 0, "gen": 1,
        "local": b"\0" * 16, "remote": b"\0" * 16, "lport": 0, "rport": 0, "repeat": 0, "comm": b"x",
    }  # fmt: skip
    return pack(r, 1)


@st.composite
def kernel_streams(draw: st.DrawFn) -> tuple[list[tuple[int, int]], int]:
    """Per-CPU sequence numbers as user space reads them: runs dropped (ring full, some wider than
    any window), some records late by a few places or by many (a softirq interleaving), a few
    read twice, CPUs interleaved. Returns the arrivals and how many records were dropped between
    each CPU's first and last arrival."""
    per_cpu: list[list[int]] = []
    dropped = 0
    for _ in range(draw(st.integers(1, 3))):
        seqs, seq = [], draw(st.integers(0, 1 << 40))
        for _ in range(draw(st.integers(1, 150))):
            gap = draw(st.sampled_from([0, 0, 0, 0, 0, 1, 3, 20, 70, 300]))
            if seqs:
                dropped += gap
            seq += gap
            seqs.append(seq)
            seq += 1
        for i in range(1, len(seqs) - 1):  # some late; the first stays first
            if draw(st.integers(0, 9)) == 0:
                j = min(len(seqs) - 1, i + draw(st.sampled_from([1, 2, 40])))
                seqs[i], seqs[j] = seqs[j], seqs[i]
        for i in sorted(draw(st.sets(st.integers(1, max(1, len(seqs) - 1)), max_size=2)), reverse=True):
            if i < len(seqs):
                seqs.insert(i, seqs[i - 1])  # read twice
        per_cpu.append(seqs)
    arrivals: list[tuple[int, int]] = []
    cursors = [0] * len(per_cpu)
    while any(c < len(s) for c, s in zip(cursors, per_cpu, strict=True)):
        cpu = draw(st.sampled_from([i for i, s in enumerate(per_cpu) if cursors[i] < len(s)]))
        arrivals.append((cpu, per_cpu[cpu][cursors[cpu]]))
        cursors[cpu] += 1
    return arrivals, dropped


class LossModel:
    """The tracker's rule, written plainly: a hole (the records missing when a later one arrives)
    is lost once all of it is older than ``settle`` sequence numbers on its CPU, less the late
    records that arrived before then; a jump over more than ``settle`` is lost at once."""

    def __init__(self, settle: int) -> None:
        self.settle = settle
        self.expected: dict[int, int] = {}
        self.holes: dict[int, list[tuple[int, int, set[int]]]] = {}  # start, end, late arrivals
        self.lost = 0

    def see(self, cpu: int, seq: int) -> None:
        exp = self.expected.get(cpu)
        holes = self.holes.setdefault(cpu, [])
        if exp is None or seq >= exp:
            if exp is not None and seq - exp > self.settle:
                self.lost += seq - exp
            elif exp is not None and seq > exp:
                holes.append((exp, seq, set()))
            self.expected[cpu] = seq + 1
        else:
            for start, end, late in holes:
                if start <= seq < end:
                    late.add(seq)
        for hole in [h for h in holes if h[1] <= self.expected[cpu] - self.settle]:
            self.lost += hole[1] - hole[0] - len(hole[2])
            holes.remove(hole)

    def settle_all(self) -> None:
        self.lost += sum(end - start - len(late) for holes in self.holes.values() for start, end, late in holes)
        self.holes.clear()


@given(kernel_streams(), st.sampled_from([4, 8, 64, 4096]), st.sets(st.integers(0, 500), max_size=3))
@settings(max_examples=300, deadline=None)
def test_hot_path_counts_sequence_gaps_as_the_tracker_does(
    stream: tuple[list[tuple[int, int]], int], settle: int, quiet_after: set[int]
) -> None:
    """The drain's inline check (in order and no hole due: no call) counts every loss when the
    tracker's rule says, record by record, and every dropped record once all holes settle."""
    from pipeline.stages import NO_HOLE, GapTracker

    arrivals, dropped = stream
    tracker = GapTracker(settle=settle)
    model = LossModel(settle)
    errors = hot.DecodeErrors(lambda *a, **k: None)
    for i, (cpu, seq) in enumerate(arrivals):  # one record per call: every arrival order the ring could give
        hot.decode_records([_conn(cpu, seq)], tracker.see, tracker.expected, tracker.due, errors)
        model.see(cpu, seq)
        assert tracker.lost == model.lost, (cpu, seq)
        if i in quiet_after:  # the stream went quiet: every open hole is counted now
            tracker.settle_all()
            model.settle_all()
            assert tracker.lost == model.lost
        # The inline path's threshold: where the oldest open hole settles, or nothing is due.
        for c, ranges in tracker.opened.items():
            assert tracker.due[c] == ranges[0][1] + settle - 1
        assert all(tracker.due[c] == NO_HOLE for c in tracker.expected if c not in tracker.opened)
    tracker.settle_all()
    model.settle_all()
    assert tracker.lost == model.lost
    # Whatever the window, independently of the rule: every record that never arrived is counted,
    # and what is counted beyond that are records that did arrive, only too late to count.
    newest: dict[int, int] = {}
    lateness = []  # how far behind the newest record of its CPU each late arrival was
    widest = 0  # the widest jump ahead (a jump wider than the window is counted lost at once)
    for cpu, seq in arrivals:
        if seq < newest.get(cpu, seq):
            lateness.append(newest[cpu] - seq)
        elif cpu in newest:
            widest = max(widest, seq - newest[cpu] - 1)
        newest[cpu] = max(seq, newest.get(cpu, seq))
    assert dropped <= tracker.lost <= dropped + len(lateness)
    if not quiet_after and widest <= settle and all(behind < settle for behind in lateness):
        assert tracker.lost == dropped  # every late record came within the window: none of them lost
