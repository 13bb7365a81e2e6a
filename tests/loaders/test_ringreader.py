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

import pytest

from loaders import abi, cgroup, errors
from loaders.ringbuf import MMAP_READER_SAFE, RingReader, record_span
from loaders.sensors import Sensors
from pipeline import hotpath as hot
from pipeline.stages import GapTracker

pytestmark = pytest.mark.kernel

PRODUCER = r"""
import os, sys
print("ready", flush=True)
for line in sys.stdin:
    for _ in range(int(line)):
        os.getppid()
    print("done", flush=True)
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
                got += hot.drain(reader, gaps.see, gaps.expected, gaps.opened, decode_errors, 1 << 20)
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
        assert r[hot.REMOTE_PORT] == 443 and r[hot.ABI] == abi.ABI_VERSION
    for seqs in by_cpu.values():
        assert seqs == sorted(set(seqs))  # each record once, in order per CPU


def test_a_map_that_is_not_a_ring_buffer_is_refused() -> None:
    with cgroup.scratch_cgroup("tooltest-ring") as path, Sensors.load(path) as sensors:
        with pytest.raises(errors.BpfError, match="not a ring buffer"):
            RingReader(sensors.maps["counters"])
