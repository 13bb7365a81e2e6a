"""RingReader: the ring buffer read straight from shared memory, checked against the kernel's counters.

The sensors' synthetic producer (each getppid() of one process emits a burst of connection
records through the real event path) fills a small ring many times over, so the reader's
position arithmetic crosses the end of the data area again and again.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict

import anyio
import pytest

from loaders import abi, cgroup, errors
from loaders.ringbuf import MMAP_READER_SAFE, RingReader, record_span
from loaders.sensors import Sensors
from pipeline import hotpath as hot
from pipeline.stages import Batch, GapTracker, PipelineStats, ring_stage

pytestmark = pytest.mark.kernel

PRODUCER = r"""
import os, sys
print("ready", flush=True)
for line in sys.stdin:
    for _ in range(int(line)):
        os.getppid()
    print("done", flush=True)
"""


# The producer, and after each burst a child that runs a program: the child's exec and exit
# records land between runs of connection records.
PRODUCER_AND_CHILDREN = r"""
import os, subprocess, sys
print("ready", flush=True)
for line in sys.stdin:
    for _ in range(int(line)):
        os.getppid()
    child = subprocess.run(["/bin/true"])
    print(child.returncode, flush=True)
"""


def test_record_span_counts_the_header_and_rounds_to_8() -> None:
    assert record_span(160) == 168
    assert record_span(161) == 176
    assert record_span(1 | (1 << 31) | (1 << 30)) == 16  # busy and discard bits are not length


@pytest.mark.skipif(not MMAP_READER_SAFE, reason="the mmap reader is used on x86 only")
def test_every_record_read_once_across_many_wraps() -> None:
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
    assert producer.stdin is not None and producer.stdout is not None
    assert producer.stdout.readline().strip() == "ready"
    burst = 64
    try:
        # 16 pages of ring (390 records): the reader wraps every 390 records, and every page of
        # the data area holds records (a record's header names its page).
        with (
            cgroup.scratch_cgroup("tooltest-ring") as path,
            Sensors.load(
                path, ringbuf_bytes=16 * os.sysconf("SC_PAGE_SIZE"), bench_tgid=producer.pid, bench_burst=burst
            ) as sensors,
        ):  # fmt: skip
            reader = RingReader(sensors.maps["events"])
            gaps = GapTracker()
            decode_errors = hot.DecodeErrors(lambda *a, **k: None)
            got: list[hot.Record] = []
            before = sensors.counters()
            for _ in range(200):
                producer.stdin.write("1\n")
                producer.stdin.flush()
                assert producer.stdout.readline().strip() == "done"
                got += hot.drain(reader, gaps.see, gaps.expected, gaps.due, decode_errors, 1 << 20)
            after = sensors.counters()
            reader.close()
    finally:
        producer.kill()
    mine = [r for r in got if type(r) is tuple and hot.task_of(r[hot.TASK]).tgid == producer.pid]
    full = after["ring_buffer_full"] - before["ring_buffer_full"]
    assert decode_errors.count == 0
    assert len(mine) + full == 200 * burst  # every record was read or counted as not queued
    assert len(mine) > 10 * 390  # and the ring wrapped many times
    by_cpu: dict[int, list[int]] = defaultdict(list)
    for r in mine:
        by_cpu[r[hot.CPU]].append(r[hot.SEQ])
        assert hot.conn_record(r).remote_port == 443 and r[hot.ABI] == abi.ABI_VERSION
    for seqs in by_cpu.values():
        assert seqs == sorted(set(seqs))  # each record once, in order per CPU


@pytest.mark.skipif(not MMAP_READER_SAFE, reason="the mmap reader is used on x86 only")
def test_process_records_between_runs_of_connection_records_keep_their_place() -> None:
    """The drain reads connection records in runs and ends a run at anything else: with exec and
    exit records between bursts, and small batches that end runs part-way, every record comes
    out once, in each CPU's order, and the process records are decoded."""
    rounds, burst = 30, 48
    with (
        cgroup.scratch_cgroup("tooltest-ring") as path,
        subprocess.Popen([sys.executable, "-c", PRODUCER_AND_CHILDREN], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, preexec_fn=cgroup.enter(path)) as producer,
    ):  # fmt: skip
        assert producer.stdin is not None and producer.stdout is not None
        assert producer.stdout.readline().strip() == "ready"
        try:
            with Sensors.load(
                path, ringbuf_bytes=16 * os.sysconf("SC_PAGE_SIZE"), bench_tgid=producer.pid, bench_burst=burst
            ) as sensors:  # fmt: skip
                reader = RingReader(sensors.maps["events"])
                gaps = GapTracker()
                decode_errors = hot.DecodeErrors(lambda *a, **k: None)
                got: list[hot.Record] = []
                before = sensors.counters()
                for _ in range(rounds):
                    producer.stdin.write("1\n")
                    producer.stdin.flush()
                    assert producer.stdout.readline().strip() == "0"
                    while batch := hot.drain(reader, gaps.see, gaps.expected, gaps.due, decode_errors, 7):
                        got += batch
                after = sensors.counters()
                reader.close()
        finally:
            producer.kill()
    assert after["ring_buffer_full"] == before["ring_buffer_full"]  # the ring never overflowed
    assert decode_errors.count == 0
    conns = [r for r in got if type(r) is tuple]
    procs = [r for r in got if type(r) is not tuple]
    assert len([r for r in conns if hot.task_of(r[hot.TASK]).tgid == producer.pid]) == rounds * burst
    execs = [r for r in procs if r.kind == abi.EV_EXEC and r.filename == "/bin/true"]
    exits = [r for r in procs if r.kind == abi.EV_EXIT and r.task.tgid in {e.task.tgid for e in execs}]
    assert len(execs) == len(exits) == rounds
    by_cpu: dict[int, list[int]] = defaultdict(list)
    for r in got:
        cpu, seq = (r[hot.CPU], r[hot.SEQ]) if type(r) is tuple else (r.cpu, r.seq)  # type: ignore[union-attr]
        by_cpu[cpu].append(seq)
    for seqs in by_cpu.values():
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # each record once, in order, no hole
    gaps.settle_all()
    assert gaps.lost == 0


def test_a_map_that_is_not_a_ring_buffer_is_refused() -> None:
    with cgroup.scratch_cgroup("tooltest-ring") as path, Sensors.load(path) as sensors:
        with pytest.raises(errors.BpfError, match="not a ring buffer"):
            RingReader(sensors.maps["counters"])


@pytest.mark.parametrize("reader", ["mmap", "libbpf"])
def test_ring_stage_accounts_for_every_record_with_either_reader(reader: str) -> None:
    """What the stage hands on, plus what the kernel could not queue, is what was produced; and
    the sequence gaps it sees are exactly the records the kernel counted as not queued."""
    if reader == "mmap" and not MMAP_READER_SAFE:
        pytest.skip("the mmap reader is used on x86 only")
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
    assert producer.stdin is not None and producer.stdout is not None
    assert producer.stdout.readline().strip() == "ready"
    stats = PipelineStats()
    got: list[hot.Record] = []

    async def run(sensors: Sensors) -> None:
        stop = anyio.Event()
        send, receive = anyio.create_memory_object_stream[Batch](4)
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: ring_stage(
                sensors.maps["events"], send, stop, stats, reader=reader, task_status=task_status))  # type: ignore[arg-type]  # fmt: skip

            async def collect() -> None:
                async with receive:
                    async for batch in receive:
                        got.extend(batch.records)

            tg.start_soon(collect)
            for _ in range(40):  # 40 x 512 records into a 390-record ring: most bursts overflow it
                await anyio.to_thread.run_sync(producer.stdin.write, "1\n")  # type: ignore[union-attr]
                await anyio.to_thread.run_sync(producer.stdin.flush)  # type: ignore[union-attr]
                assert (await anyio.to_thread.run_sync(producer.stdout.readline)).strip() == "done"  # type: ignore[union-attr]
            await anyio.sleep(0.3)
            stop.set()

    try:
        with (
            cgroup.scratch_cgroup("tooltest-ring") as path,
            Sensors.load(path, ringbuf_bytes=16 * os.sysconf("SC_PAGE_SIZE"), bench_tgid=producer.pid,
                         bench_burst=512) as sensors,
        ):  # fmt: skip
            before = sensors.counters()
            anyio.run(run, sensors)
            after = sensors.counters()
    finally:
        producer.kill()
    full = after["ring_buffer_full"] - before["ring_buffer_full"]
    stats.gaps.settle_all()
    assert stats.decode_errors == 0
    assert full > 0  # the ring did overflow
    assert len(got) + full == 40 * 512
    # Within the span of sequence numbers seen, every missing one is a counted loss (losses
    # after the last record seen show only in the kernel's counter).
    seqs: dict[int, list[int]] = defaultdict(list)
    for r in got:
        assert type(r) is tuple
        seqs[r[hot.CPU]].append(r[hot.SEQ])
    span = sum(max(s) - min(s) + 1 for s in seqs.values())
    assert stats.gaps.lost == span - len(got)
    assert 0 < stats.gaps.lost <= full


def test_ring_stage_says_drained_only_once_every_waiting_record_is_taken() -> None:
    """The agent's final loss report waits for ``drained``: records already in the ring when stop
    is set are all taken (and their gaps seen) by then."""
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
    assert producer.stdin is not None and producer.stdout is not None
    assert producer.stdout.readline().strip() == "ready"
    stats = PipelineStats()
    seen_when_drained: list[int] = []

    async def run(sensors: Sensors) -> None:
        stop, drained = anyio.Event(), anyio.Event()
        stop.set()  # the records below are all waiting when the stage starts: only the drain takes them
        send, receive = anyio.create_memory_object_stream[Batch](1)
        async with anyio.create_task_group() as tg:

            async def collect() -> None:
                async with receive:
                    async for _batch in receive:
                        await anyio.sleep(0.01)  # a slow consumer: the drain takes several turns

            async def watch() -> None:
                await drained.wait()
                seen_when_drained.append(stats.records)

            tg.start_soon(collect)
            tg.start_soon(watch)
            await tg.start(lambda task_status: ring_stage(
                sensors.maps["events"], send, stop, stats, drained=drained, task_status=task_status))  # type: ignore[arg-type]  # fmt: skip

    try:
        with (
            cgroup.scratch_cgroup("tooltest-ring") as path,
            Sensors.load(path, ringbuf_bytes=1 << 22, bench_tgid=producer.pid, bench_burst=512) as sensors,
        ):  # fmt: skip
            for _ in range(8):  # 4096 records, all held by the ring
                producer.stdin.write("1\n")
                producer.stdin.flush()
                assert producer.stdout.readline().strip() == "done"
            assert sensors.counters()["ring_buffer_full"] == 0
            anyio.run(run, sensors)
    finally:
        producer.kill()
    assert seen_when_drained == [8 * 512]
