"""Enrich stage: who the process is (executable, command line, parents, user) and where it lives (cgroup).

Identity comes first from what the kernel captured at exec (so a process that
lived a millisecond is still named), then from /proc, but only when /proc
still shows the same process: a pid recycled by another program is never
reported with the newcomer's identity.
"""

from __future__ import annotations

import os
import pwd
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from pipeline.events import Ancestor, Cgroup, Process

_CLK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
# /proc gives a start time in clock ticks: accept that much rounding when matching the kernel's exec id.
_START_SLACK_NS = 2 * _CLK_NS

_CONTAINER_RE = re.compile(
    r"(?:docker-|cri-containerd-|crio-|libpod-|containerd-)?([0-9a-f]{64})(?:\.scope)?$"
)
_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".slice")


@dataclass
class ProcInfo:
    """What is known of one process (one exec of one pid)."""

    tgid: int
    exec_id: int
    ppid: int
    exe: str | None
    cmdline: list[str]
    comm: str
    exited: bool = False


@dataclass
class ProcessTable:
    """Processes by (tgid, exec_id), fed by exec/exit records and completed from /proc."""

    proc: str = "/proc"
    max_exited: int = 16384
    live: dict[int, ProcInfo] = field(default_factory=dict)  # tgid -> current exec
    exited: OrderedDict[tuple[int, int], ProcInfo] = field(default_factory=OrderedDict)

    def on_exec(
        self, tgid: int, exec_id: int, ppid: int, filename: str, args: list[str], comm: str, exe_ino: int = 0
    ) -> None:
        """Record what the kernel saw at exec.

        The path given to execve may be relative or a symlink: while the process
        still runs the same file (same inode), /proc gives its resolved path.
        """
        exe = filename
        resolved = self._read_exe(tgid)
        if resolved is not None:
            try:
                same = exe_ino == 0 or os.stat(f"{self.proc}/{tgid}/exe").st_ino == exe_ino
            except OSError:
                same = False
            if same:
                exe = resolved
        elif filename.startswith("/") and exe_ino:
            # Already gone: resolve the path it gave, if that is still the same file.
            try:
                if os.stat(filename).st_ino == exe_ino:
                    exe = os.path.realpath(filename)
            except OSError:
                pass
        old = self.live.get(tgid)
        if old is not None and old.exec_id != exec_id:
            self._retire(old)
        self.live[tgid] = ProcInfo(tgid, exec_id, ppid, exe, args, comm)

    def on_exit(self, tgid: int, exec_id: int) -> None:
        """The process is gone: keep its identity a while for events still in flight."""
        info = self.live.pop(tgid, None)
        if info is not None:
            self._retire(info)

    def _retire(self, info: ProcInfo) -> None:
        info.exited = True
        self.exited[(info.tgid, info.exec_id)] = info
        while len(self.exited) > self.max_exited:
            self.exited.popitem(last=False)

    def lookup(self, tgid: int, exec_id: int, comm: str) -> ProcInfo | None:
        """The process that made an event, or None when it cannot be told apart from a recycled pid."""
        info = self.live.get(tgid)
        if info is not None and (exec_id == 0 or info.exec_id == exec_id or info.exec_id == 0):
            return info
        old = self.exited.get((tgid, exec_id))
        if old is not None:
            return old
        return self._from_proc(tgid, exec_id, comm)

    def _read_exe(self, tgid: int) -> str | None:
        try:
            return os.readlink(f"{self.proc}/{tgid}/exe")
        except OSError:
            return None

    def _from_proc(self, tgid: int, exec_id: int, comm: str) -> ProcInfo | None:
        base = f"{self.proc}/{tgid}"
        try:
            with open(f"{base}/stat", "rb") as f:
                stat = f.read()
            with open(f"{base}/cmdline", "rb") as f:
                raw_cmd = f.read()
        except OSError:
            return None
        tail = stat[stat.rindex(b")") + 2 :].split()
        ppid = int(tail[1])
        start_ns = int(tail[19]) * _CLK_NS
        if exec_id and abs(start_ns - exec_id) > _START_SLACK_NS:
            return None  # a different process now has this pid
        info = ProcInfo(
            tgid,
            exec_id or start_ns,
            ppid,
            self._read_exe(tgid),
            [a.decode("utf-8", "replace") for a in raw_cmd.rstrip(b"\0").split(b"\0")] if raw_cmd else [],
            comm,
        )
        self.live[tgid] = info
        return info

    def ancestors(self, ppid: int, depth: int = 4) -> list[Ancestor]:
        """The parent chain, nearest first, as far as it is known."""
        out: list[Ancestor] = []
        pid = ppid
        seen: set[int] = set()
        while pid > 0 and len(out) < depth and pid not in seen:
            seen.add(pid)
            info = self.live.get(pid)
            if info is None:
                info = self._from_proc(pid, 0, "")
            if info is None:
                out.append(Ancestor(pid=pid))
                break
            out.append(Ancestor(pid=pid, exe=info.exe, comm=info.comm or None))
            pid = info.ppid
        return out


class UserNames:
    """uid -> user name, cached."""

    def __init__(self) -> None:
        self._cache: dict[int, str | None] = {}

    def name(self, uid: int) -> str | None:
        if uid not in self._cache:
            try:
                self._cache[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._cache[uid] = None
        return self._cache[uid]


class CgroupNames:
    """cgroup id (the directory's inode) -> Cgroup with path, systemd unit and container id."""

    RESCAN_INTERVAL_S = 1.0

    def __init__(self, root: str) -> None:
        self.root = root
        self._by_id: dict[int, Cgroup] = {}
        self._last_scan = 0.0

    def _scan(self) -> None:
        self._last_scan = time.monotonic()
        by_id: dict[int, Cgroup] = {}
        root_len = len(self.root.rstrip("/"))
        for dirpath, _dirs, _files in os.walk(self.root):
            try:
                ino = os.stat(dirpath).st_ino
            except OSError:
                continue
            rel = dirpath[root_len:] or "/"
            by_id[ino] = describe_cgroup(ino, rel)
        self._by_id = by_id

    def get(self, cgroup_id: int) -> Cgroup:
        c = self._by_id.get(cgroup_id)
        if c is None and time.monotonic() - self._last_scan >= self.RESCAN_INTERVAL_S:
            self._scan()
            c = self._by_id.get(cgroup_id)
        return c if c is not None else Cgroup(id=cgroup_id)


def describe_cgroup(cgroup_id: int, path: str) -> Cgroup:
    """Derive the systemd unit and container id a cgroup path reveals.

    >>> describe_cgroup(1, "/system.slice/nginx.service").systemd_unit
    'nginx.service'
    """
    unit = None
    container = None
    for part in reversed(path.strip("/").split("/")):
        if container is None:
            m = _CONTAINER_RE.search(part)
            if m:
                container = m.group(1)
        if unit is None and part.endswith(_UNIT_SUFFIXES) and not part.endswith(".slice"):
            unit = part
    return Cgroup(id=cgroup_id, path=path, systemd_unit=unit, container_id=container)


def process_of(
    table: ProcessTable,
    users: UserNames,
    tgid: int,
    pid: int,
    exec_id: int,
    ppid: int,
    uid: int,
    gid: int,
    comm: str,
) -> Process:
    """Build the published Process for an event."""
    info = table.lookup(tgid, exec_id, comm)
    if info is None:
        return Process(
            pid=tgid, tid=pid, ppid=ppid, uid=uid, gid=gid, user=users.name(uid), comm=comm, exec_id=exec_id
        )
    parent = ppid or info.ppid
    return Process(
        pid=tgid,
        tid=pid,
        ppid=parent,
        uid=uid,
        gid=gid,
        user=users.name(uid),
        comm=comm,
        exe=info.exe,
        cmdline=info.cmdline,
        exec_id=info.exec_id,
        ancestors=table.ancestors(parent),
    )
