"""A TCP listener bound before the sensors were loaded is still named on its accepted connections."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from loaders import abi, cgroup
from loaders.ringbuf import RingBuffer
from loaders.sensors import Sensors
from pipeline.decode import ConnRecord, decode
from tests.kernel_support import require_kernel

SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", 0))
s.listen(8)
print(s.getsockname()[1], flush=True)
sys.stdin.readline()  # the sensors are loaded now
c, _ = s.accept()
print("accepted", flush=True)
c.close()
"""


def accepts(sensors: Sensors, port: int) -> list[ConnRecord]:
    records: list[bytes] = []
    with RingBuffer({"events": (sensors.maps["events"], records.append)}) as rb:
        rb.consume()
    out = [decode(r) for r in records]
    return [r for r in out if isinstance(r, ConnRecord) and r.kind == abi.EV_ACCEPT and r.local_port == port]


@pytest.mark.parametrize("seed", [True, False])
def test_accept_names_a_listener_bound_before_the_sensors(seed: bool) -> None:
    require_kernel()
    with cgroup.scratch_cgroup("tooltest-listen") as path:
        server = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, preexec_fn=cgroup.enter(path))  # fmt: skip
        assert server.stdin is not None and server.stdout is not None
        try:
            port = int(server.stdout.readline())
            with open(f"/proc/{server.pid}/comm") as f:
                comm = f.read().strip()
            cgroup_id = cgroup.cgroup_id(path)
            with Sensors.load(path) as sensors:
                added = sensors.seed_listeners() if seed else 0
                server.stdin.write("go\n")
                server.stdin.flush()
                with socket.create_connection(("127.0.0.1", port), timeout=5):
                    assert server.stdout.readline().strip() == "accepted"
                server.wait(5)
                (acc,) = accepts(sensors, port)
        finally:
            server.kill()
    if seed:
        assert added >= 1
        assert (acc.task.tgid, acc.task.comm, acc.task.cgroup_id) == (server.pid, comm, cgroup_id)
    else:  # the control: without seeding, nobody is known to own the listener
        assert acc.task.tgid == 0
