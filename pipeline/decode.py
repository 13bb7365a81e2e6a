"""Decode stage: ring-buffer records to typed records, with precompiled layouts (no reflection)."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable
from typing import NamedTuple, cast

from loaders import abi

_CONN = abi.CONN_RECORD
_EXEC = abi.EXEC_RECORD
_V4_PREFIX = b"\0" * 10 + b"\xff\xff"

KIND_NAMES = {
    abi.EV_CONNECT: "connect",
    abi.EV_SENDMSG: "sendmsg",
    abi.EV_INBOUND: "inbound",
    abi.EV_ACCEPT: "accept",
    abi.EV_BIND: "bind",
    abi.EV_SOCKET: "socket",
    abi.EV_EXEC: "exec",
    abi.EV_EXIT: "exit",
}
DIRECTION_NAMES = {
    abi.DIR_EGRESS: "egress",
    abi.DIR_INGRESS: "ingress",
    abi.DIR_LISTEN: "listen",
    abi.DIR_RAW: "raw",
}
VERDICT_NAMES = {
    abi.VERDICT_ALLOW: "allowed",
    abi.VERDICT_BLOCK: "blocked",
    abi.VERDICT_WOULD_BLOCK: "would-block",
    abi.VERDICT_ALERT: "alert",
}
MODE_NAMES = {abi.MODE_DETECT: "detect", abi.MODE_PREVENT: "prevent"}
PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp", 255: "raw"}


class DecodeError(ValueError):
    """A record that does not match the ABI (wrong size, kind or version)."""


class Task(NamedTuple):
    pid: int
    tgid: int
    ppid: int
    uid: int
    gid: int
    exec_id: int
    cgroup_id: int
    comm: str


class ConnRecord(NamedTuple):
    kind: int
    flags: int
    ts_ns: int
    seq: int
    cpu: int
    task: Task
    netns_cookie: int
    sock_cookie: int
    family: int
    protocol: int
    direction: int
    verdict: int
    mode: int
    action: int
    sock_type: int
    rule_id: int
    policy_gen: int
    local_addr: str
    remote_addr: str
    local_port: int
    remote_port: int
    repeat: int


class ExecRecord(NamedTuple):
    kind: int
    flags: int
    ts_ns: int
    seq: int
    cpu: int
    task: Task
    exe_ino: int
    exe_dev: int
    exit_code: int
    filename: str
    args: list[str]


Record = ConnRecord | ExecRecord

_addr_cache: dict[bytes, str] = {}


def addr_text(raw: bytes) -> str:
    """16 address bytes (IPv6, or IPv4 as ::ffff:a.b.c.d) to text; IPv4 in dotted form."""
    text = _addr_cache.get(raw)
    if text is None:
        if raw[:12] == _V4_PREFIX:
            text = ".".join(str(b) for b in raw[12:])
        else:
            text = str(ipaddress.IPv6Address(raw))
        if len(_addr_cache) > 65536:
            _addr_cache.clear()
        _addr_cache[raw] = text
    return text


def _comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


# A thread sends many records in a row: its Task is built once and shared (tuples are immutable).
_task_cache: dict[tuple[object, ...], Task] = {}
# NamedTuple construction through the generated __new__ (or ``_make``) costs a Python call
# per record; tuple.__new__ bound with functools.partial builds the same object in C.
_new_task = cast(Callable[[tuple[object, ...]], Task], functools.partial(tuple.__new__, Task))
_new_conn = cast(Callable[[tuple[object, ...]], ConnRecord], functools.partial(tuple.__new__, ConnRecord))


def _task(f: tuple[object, ...]) -> Task:
    """The Task of an unpacked record (fields 7 to 15 of both layouts), cached."""
    key = f[7:16]
    task = _task_cache.get(key)
    if task is None:
        task = _new_task((f[7], f[8], f[9], f[10], f[11], f[13], f[14], _comm(f[15])))  # type: ignore[arg-type]
        if len(_task_cache) > 16384:
            _task_cache.clear()
        _task_cache[key] = task
    return task


def decode(data: bytes) -> Record:
    """Decode one ring-buffer record.

    Raises:
        DecodeError: the record is not one this ABI knows.
    """
    if len(data) < 2:
        raise DecodeError(f"record of {len(data)} bytes is shorter than a header")
    kind = data[0] | (data[1] << 8)
    if kind <= abi.EV_SOCKET and kind >= abi.EV_CONNECT:
        if len(data) < _CONN.size:
            raise DecodeError(f"connection record of {len(data)} bytes, expected {_CONN.size}")
        f = _CONN.unpack_from(data)
        if f[6] != abi.ABI_VERSION:
            raise DecodeError(f"record ABI version {f[6]}, this agent speaks {abi.ABI_VERSION}")
        # Cache hits inline (a call per field costs as much as the unpacking).
        addrs = _addr_cache
        return _new_conn((
            f[0], f[2], f[3], f[4], f[5], _task_cache.get(f[7:16]) or _task(f),
            f[16], f[17], f[18], f[19], f[20], f[21], f[22], f[23], f[24], f[25], f[26],
            addrs.get(f[27]) or addr_text(f[27]), addrs.get(f[28]) or addr_text(f[28]), f[29], f[30], f[31],
        ))  # fmt: skip
    if kind in (abi.EV_EXEC, abi.EV_EXIT):
        if len(data) < _EXEC.size:
            raise DecodeError(f"exec record of {len(data)} bytes, expected {_EXEC.size}")
        f = _EXEC.unpack_from(data)
        if f[6] != abi.ABI_VERSION:
            raise DecodeError(f"record ABI version {f[6]}, this agent speaks {abi.ABI_VERSION}")
        filename = f[22][: f[19]].decode("utf-8", "replace")
        args_raw: bytes = f[23][: f[20]]
        args = [a.decode("utf-8", "replace") for a in args_raw.rstrip(b"\0").split(b"\0")] if args_raw else []
        return ExecRecord(
            f[0], f[2], f[3], f[4], f[5],
            _task(f),
            f[16], f[17], f[18], filename, args,
        )  # fmt: skip
    raise DecodeError(f"unknown record kind {kind}")
