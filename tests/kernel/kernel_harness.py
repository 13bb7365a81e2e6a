"""Helpers for the real-kernel sensor tests: Sensors in a scratch cgroup, policies, child processes."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loaders import RingBuffer, cgroup
from loaders.sensors import Sensors, build_tables
from pipeline.decode import ConnRecord, ExecRecord, Record, decode
from pipeline.policy import CompiledPolicy, compile_policy, load_policy

PYTHON = sys.executable
REAL_PYTHON = os.path.realpath(sys.executable)
CHILD_COMM = os.path.basename(sys.executable)[:15]
NOBODY = 65534

# The child: runs a JSON list of operations and prints one result per operation.
CHILD = r"""
import errno, json, os, socket, sys

def run(op):
    kind = op[0]
    if kind == "connect":
        _, fam, typ, addr, port, timeout = op
        s = socket.socket(fam, typ)
        s.settimeout(timeout)
        try:
            s.connect((addr, port))
        finally:
            s.close()
    elif kind == "sendto":
        _, fam, addr, port, count, payload = op
        data = bytes.fromhex(payload)
        s = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            for _ in range(count):
                s.sendto(data, (addr, port))
        finally:
            s.close()
    elif kind == "bind":
        _, fam, typ, addr, port = op
        s = socket.socket(fam, typ)
        try:
            s.bind((addr, port))
            return "ok:%d" % s.getsockname()[1]
        finally:
            s.close()
    elif kind == "socket":
        _, fam, typ, proto = op
        socket.socket(fam, typ, proto).close()
    elif kind == "comm":
        with open("/proc/self/comm", "w") as f:
            f.write(op[1])
    elif kind == "setuid":
        os.setgroups([])
        os.setgid(op[1])
        os.setuid(op[1])
    return "ok"

out = []
for op in json.loads(sys.argv[1]):
    try:
        out.append(run(op))
    except OSError as exc:
        out.append(errno.errorcode.get(exc.errno, "E?") if exc.errno else type(exc).__name__)
print(json.dumps(out), flush=True)
"""


@dataclass
class ChildResult:
    """What a child process did: its pid, exit status and one result per operation."""

    pid: int
    returncode: int
    results: list[str]
    stderr: str


@dataclass
class Harness:
    """A loaded :class:`Sensors` attached to a scratch cgroup, with its ring buffer consumer."""

    sensors: Sensors
    cgroup_path: str
    workdir: Path
    records: list[Record] = field(default_factory=list)
    rb: RingBuffer | None = None

    def __post_init__(self) -> None:
        self.rb = RingBuffer({"events": (self.sensors.maps["events"], self._on_record)})

    def _on_record(self, data: bytes) -> None:
        self.records.append(decode(data))

    @property
    def cgroup_rel(self) -> str:
        """The scratch cgroup's path relative to the cgroup2 root, with a leading '/'."""
        return "/" + os.path.relpath(self.cgroup_path, cgroup.cgroup2_root())

    def close(self) -> None:
        """Free the ring buffer consumer (the sensors are closed by their owner)."""
        if self.rb is not None:
            self.rb.close()
            self.rb = None

    # ---- policy ----

    def apply(
        self,
        rules: Sequence[dict[str, Any]],
        defaults: dict[str, Any] | None = None,
        spec_mode: str | None = None,
    ) -> tuple[CompiledPolicy, int]:
        """Write, load, compile and apply a one-document policy; return it and its generation."""
        spec: dict[str, Any] = {
            "defaults": defaults if defaults is not None else {"detect": "alert", "prevent": "deny"},
            "rules": list(rules),
        }
        if spec_mode:
            spec["mode"] = spec_mode
        doc = {"apiVersion": "tool/v1", "kind": "Policy", "metadata": {"name": "t"}, "spec": spec}
        fd, name = tempfile.mkstemp(suffix=".yaml", dir=self.workdir)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(doc, f)
        compiled = compile_policy(load_policy([Path(name)]))
        gen = self.sensors.apply_policy(build_tables(compiled, cgroup.cgroup2_root()))
        return compiled, gen

    # ---- processes ----

    def preexec(self, cgroup_path: str | None = None) -> Callable[[], None]:
        """A preexec_fn that moves the child into the scratch cgroup (or ``cgroup_path``)."""
        return cgroup.enter(cgroup_path or self.cgroup_path)

    def run(
        self, ops: Sequence[Sequence[Any]], *, cgroup_path: str | None = None, timeout: float = 30
    ) -> ChildResult:
        """Run the operation child in the cgroup and wait for it."""
        proc = subprocess.Popen(
            [PYTHON, "-c", CHILD, json.dumps([list(op) for op in ops])],
            preexec_fn=self.preexec(cgroup_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = proc.communicate(timeout=timeout)
        results = json.loads(out) if out.strip() else []
        return ChildResult(proc.pid, proc.returncode, results, err)

    def argv(
        self, argv: Sequence[str], *, cgroup_path: str | None = None, timeout: float = 30
    ) -> ChildResult:
        """Run an arbitrary command in the cgroup; ``results`` holds its stdout lines."""
        proc = subprocess.run(
            list(argv), preexec_fn=self.preexec(cgroup_path), capture_output=True, text=True, timeout=timeout
        )
        return ChildResult(0, proc.returncode, proc.stdout.splitlines(), proc.stderr)

    # ---- records ----

    def drain(self) -> list[Record]:
        """Consume the ring buffer and return (and forget) every record seen so far."""
        assert self.rb is not None
        self.rb.consume()
        out, self.records = self.records, []
        return out

    def conns(self, tgid: int, kind: int | None = None) -> list[ConnRecord]:
        """Drain, then return the connection records of process ``tgid`` (of one kind if given)."""
        return [
            r
            for r in self.drain()
            if isinstance(r, ConnRecord) and r.task.tgid == tgid and (kind is None or r.kind == kind)
        ]


def exec_records(records: Sequence[Record], tgid: int) -> list[ExecRecord]:
    """The exec/exit records of process ``tgid``."""
    return [r for r in records if isinstance(r, ExecRecord) and r.task.tgid == tgid]


def read_line(stream: Any, timeout: float) -> str:
    """Read one line from a child's pipe, failing after ``timeout`` seconds instead of hanging."""
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no line from the child within {timeout} s")
    return str(stream.readline()).strip()


def free_port(family: int = 2, kind: int = 1) -> int:
    """A port that is free on loopback right now (for children that must bind an explicit port)."""
    import socket

    with socket.socket(family, kind) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SubCgroups:
    """Child cgroups made below the scratch cgroup, removed (leaf first) on exit."""

    parent: str
    paths: list[str] = field(default_factory=list)

    def make(self, name: str) -> str:
        path = os.path.join(self.parent, name)
        os.mkdir(path)
        self.paths.append(path)
        return path

    def cleanup(self) -> None:
        for path in reversed(self.paths):
            if os.path.isdir(path):
                cgroup.remove(path)
        self.paths.clear()


def harness_session(tmp: Path, **load_args: Any) -> Iterator[Harness]:
    """Yield a Harness for a fresh scratch cgroup and Sensors; everything is removed afterwards."""
    with cgroup.scratch_cgroup() as path, Sensors.load(path, **load_args) as sensors:
        h = Harness(sensors, path, tmp)
        try:
            yield h
        finally:
            h.close()
