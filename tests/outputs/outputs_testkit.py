"""Helpers shared by the output tests (a module of its own: every test folder has a conftest)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import anyio

from pipeline.events import (
    Cgroup,
    ConnectionEvent,
    Endpoint,
    LossEvent,
    PolicyEvent,
    Process,
    RuleRef,
)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class NatsServer:
    """A nats-server process on a fixed port that can be stopped and started again."""

    def __init__(self, workdir: Path, *, jetstream: bool = False) -> None:
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._workdir = workdir
        self._jetstream = jetstream
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it accepts connections."""
        binary = shutil.which("nats-server")
        assert binary is not None, "nats-server not on PATH"
        args = [binary, "-a", "127.0.0.1", "-p", str(self.port)]
        if self._jetstream:
            args += ["-js", "-sd", str(self._workdir / "js")]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not _accepts(self.port):
            try:  # waits on the process (it must not exit), between connection attempts
                code = self._proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                code = None
            if code is not None:
                raise RuntimeError(f"nats-server exited with {code}")
            if time.monotonic() > deadline:
                raise TimeoutError("nats-server did not start")

    def stop(self) -> None:
        """Stop the server and wait for the process to end."""
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._proc = None


def audit_lines(path: Path) -> list[str]:
    """The lines of an audit file (empty when it does not exist)."""
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


T0 = 1_714_564_800_123_000_000  # 2024-05-01T12:00:00.123Z


def connection(
    seq: int,
    *,
    cpu: int = 0,
    verdict: str = "allowed",
    known: bool = True,
    host: str = "web1",
    time_ns: int = T0,
    comm: str = "curl",
) -> ConnectionEvent:
    """A typical egress decision."""
    rule = RuleRef(id=7, name="allow-https", policy="/etc/tool/policy.yaml") if known else RuleRef(id=0)
    return ConnectionEvent(
        id=f"ev-{cpu}-{seq}",
        time_ns=time_ns,
        host=host,
        kind="connect",
        direction="egress",
        protocol="tcp",
        family="ipv4",
        verdict=verdict,  # type: ignore[arg-type]
        mode="prevent",
        known=known,
        rule=rule,
        local=Endpoint("10.0.0.5", 51234),
        remote=Endpoint("93.184.216.34", 443, name="example.com"),
        process=Process(
            pid=4242,
            ppid=1,
            uid=1000,
            user="alice",
            comm=comm,
            exe="/usr/bin/curl",
            cmdline=["curl", "-s", "https://example.com/"],
        ),
        cgroup=Cgroup(id=1, path="/user.slice/user-1000.slice", container_id="c0ffee"),
        cpu=cpu,
        seq=seq,
    )


def loss(delta: int = 5, total: int = 5, host: str = "web1") -> LossEvent:
    """A loss report."""
    return LossEvent(
        id="loss-1",
        time_ns=T0,
        host=host,
        ring_buffer_full=total,
        ring_buffer_full_delta=delta,
        folded=3,
        folded_delta=3,
        sequence_gaps=delta,
        sequence_gaps_delta=delta,
        decode_errors=2,
    )


def policy(kind: str = "loaded", generation: int = 3) -> PolicyEvent:
    """A policy reload."""
    return PolicyEvent(
        id=f"policy-{generation}",
        time_ns=T0,
        host="web1",
        kind=kind,  # type: ignore[arg-type]
        sources=["/etc/tool/policy.yaml"],
        generation=generation,
        rules=12,
        errors=["line 3: unknown key 'prot'"] if kind == "rejected" else [],
        duration_ms=12.5,
    )


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` on the event loop until it holds.

    Raises:
        TimeoutError: it did not within ``timeout`` seconds.
    """
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.005)
