"""Attaching for real: connect4 in a scratch cgroup refuses one port, the ring buffer reports each call,
links pin and re-open, raw tracepoints auto-attach."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from loaders import BpfObject, Link, RingBuffer, cgroup, errors, wait_readable

pytestmark = pytest.mark.kernel

TEST_OBJECT = Path(__file__).parent / "data" / "test_progs.bpf.o"
MAGIC = 0x7E57
EVENT = struct.Struct("=IHHQ")  # struct test_event: magic, port, verdict, cgroup_id

CHILD = """
import json, socket, sys
results = {}
for port in map(int, sys.argv[1:]):
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
        results[port] = "ok"
    except OSError as exc:
        results[port] = str(exc)
    finally:
        s.close()
print(json.dumps(results))
"""


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A loopback TCP listener whose port the program allows."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock


@pytest.fixture
def denied_port() -> int:
    """A loopback port with no listener, which the program refuses."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def obj(denied_port: int) -> Iterator[BpfObject]:
    with BpfObject.open(TEST_OBJECT) as loaded:
        loaded.set_rodata("deny_port", struct.pack("=H", denied_port))
        loaded.set_rodata("event_magic", struct.pack("=I", MAGIC))
        loaded.set_rodata("target_tgid", struct.pack("=I", os.getpid()))
        loaded.load()
        yield loaded


@pytest.fixture
def scratch() -> Iterator[str]:
    with cgroup.scratch_cgroup() as path:
        yield path


def connect_from(cgroup_path: str, *ports: int) -> dict[int, str]:
    """Run a child inside ``cgroup_path`` that connects to each port; return what each gave."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, ports)],
        preexec_fn=cgroup.enter(cgroup_path),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return {int(port): result for port, result in json.loads(done.stdout).items()}


def attach(obj: BpfObject, cgroup_path: str) -> Link:
    fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return obj.program("connect4_prog").attach_cgroup(fd)
    finally:
        os.close(fd)


def test_connect4_refuses_the_denied_port_and_reports_each_call(
    obj: BpfObject, scratch: str, listener: socket.socket, denied_port: int
) -> None:
    allowed_port = listener.getsockname()[1]
    records: list[tuple[int, int, int, int]] = []
    maps = {"events": (obj.map("events"), lambda d: records.append(EVENT.unpack(d)))}
    with attach(obj, scratch), RingBuffer(maps) as rb:
        results = connect_from(scratch, allowed_port, denied_port)
        assert results[allowed_port] == "ok"
        assert "[Errno 1]" in results[denied_port]
        assert rb.consume() >= 2
    cg_id = cgroup.cgroup_id(scratch)
    ours = [(port, verdict) for magic, port, verdict, cg in records if magic == MAGIC and cg == cg_id]
    assert ours == [(allowed_port, 1), (denied_port, 0)]


def test_nothing_is_refused_outside_the_scratch_cgroup(
    obj: BpfObject, scratch: str, denied_port: int
) -> None:
    with attach(obj, scratch), socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", denied_port))  # this process is not in the cgroup


@pytest.mark.anyio
async def test_ring_buffer_wakes_an_anyio_waiter(obj: BpfObject, scratch: str, denied_port: int) -> None:
    records: list[bytes] = []
    with attach(obj, scratch), RingBuffer({"events": (obj.map("events"), records.append)}) as rb:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, connect_from, scratch, denied_port)
            with anyio.fail_after(30):
                while not records:
                    await wait_readable(rb)
                    rb.consume()
    assert EVENT.unpack(records[0])[:3] == (MAGIC, denied_port, 0)


def test_callback_exception_is_reraised_after_consume(obj: BpfObject, scratch: str, denied_port: int) -> None:
    seen: list[bytes] = []

    def explode(data: bytes) -> None:
        seen.append(data)
        if len(seen) == 1:
            raise RuntimeError("decoder broke")

    with attach(obj, scratch), RingBuffer({"events": (obj.map("events"), explode)}) as rb:
        connect_from(scratch, denied_port, denied_port)
        with pytest.raises(RuntimeError, match="decoder broke"):
            rb.consume()
        assert rb.consume() == 1  # the record that raised was consumed; the next one is delivered
    assert len(seen) == 2


def test_zero_copy_callback_gets_a_buffer(obj: BpfObject, scratch: str, denied_port: int) -> None:
    ports: list[int] = []
    rb_map = obj.map("events")
    with (
        attach(obj, scratch),
        RingBuffer({"events": (rb_map, lambda b: ports.append(EVENT.unpack(b)[1]))}, copy=False) as rb,
    ):
        connect_from(scratch, denied_port)
        rb.poll(1000)
    assert ports == [denied_port]


def test_pinned_link_keeps_the_program_attached_until_unpinned(
    obj: BpfObject, scratch: str, denied_port: int, pin_dir: Path
) -> None:
    path = pin_dir / "connect4"
    link = attach(obj, scratch)
    link.pin(path)
    assert link.pin_path == str(path)
    link.close()
    link.close()
    assert "[Errno 1]" in connect_from(scratch, denied_port)[denied_port]
    reopened = Link.open_pinned(path)
    reopened.unpin()
    reopened.detach()
    assert "[Errno 111]" in connect_from(scratch, denied_port)[denied_port]
    reopened.close()


def test_open_pinned_link_missing_raises_not_found(pin_dir: Path) -> None:
    with pytest.raises(errors.NotFound):
        Link.open_pinned(pin_dir / "absent")


def test_raw_tracepoint_attaches_by_section(obj: BpfObject) -> None:
    hits = obj.map("raw_hits")
    with obj.program("raw_sys_enter").attach():
        os.getppid()
        value = hits.lookup(bytes(4))
    assert value is not None and struct.unpack("=Q", value)[0] > 0


def test_scratch_cgroup_is_removed_even_with_a_process_inside() -> None:
    with cgroup.scratch_cgroup() as path:
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"],
            stdin=subprocess.PIPE,
            preexec_fn=cgroup.enter(path),
        )
        assert cgroup.pids(path) == [child.pid]
    try:
        assert not os.path.exists(path)
    finally:
        child.kill()
        child.wait()
