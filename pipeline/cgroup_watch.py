"""Follow cgroups created after the policy was loaded: containers, units, scopes.

The kernel matches a rule's ``cgroup``, ``unit`` and ``container`` selectors by cgroup id,
and the ids come from resolving the selectors' globs against the cgroup tree when the policy
is swapped in. A container started afterwards (``container: [3f2a9c]`` is the glob
``**/*3f2a9c*``) or a unit started later has a cgroup nobody resolved, so its processes would
fall to the default until the next reload. This watcher sees each new cgroup directory
(inotify on the cgroup v2 tree; ``mkdir`` there raises ``IN_CREATE`` like on any file system)
and, when one matches a selector of the policy in force, has the policy swapped in again so
the new id is in the kernel's tables. It watches whenever the policy has such selectors, plain
paths included: ``systemctl restart`` makes a unit's cgroup again, with a new id.

Between the cgroup's creation and the swap (milliseconds for a small policy) a process in it
is decided without its cgroup rules; container runtimes create the cgroup before they start
the container's process, which usually leaves enough time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from collections.abc import Awaitable, Callable

import anyio
import structlog

from pipeline.policy.globs import glob_match

log = structlog.get_logger(__name__)

IN_CREATE = 0x00000100
IN_DELETE_SELF = 0x00000400
IN_MOVED_TO = 0x00000080
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ISDIR = 0x40000000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")
SETTLE_S = 0.02
"""How long to let a burst of mkdirs (a pod's cgroups) gather before one swap."""

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


def _inotify_init() -> int:
    fd: int = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        hint = " (raise fs.inotify.max_user_instances)" if err == errno.EMFILE else ""
        raise OSError(err, f"cannot watch the cgroup tree: inotify_init1: {os.strerror(err)}{hint}")
    return fd


class CgroupWatcher:
    """Calls ``on_match`` with the new cgroups (paths relative to the root) that match ``patterns``.

    Args:
        root: the cgroup v2 mount.
        patterns: selectors in the policy's glob dialect, relative to the root.
        on_match: awaited once per gathered burst that has a match.
    """

    def __init__(self, root: str, patterns: list[str], on_match: Callable[[list[str]], Awaitable[None]]) -> None:
        self.root = root.rstrip("/") or "/"
        self.patterns = patterns
        self._on_match = on_match
        self._fd = -1
        self._paths: dict[int, str] = {}  # watch descriptor -> absolute directory
        self.overflows = 0
        self.unwatched = 0  # directories left unwatched for want of inotify watches

    def _add(self, directory: str) -> None:
        """Watch ``directory`` and every directory below it (created before the watch landed)."""
        for current, dirs, _ in os.walk(directory):
            wd = _libc.inotify_add_watch(self._fd, os.fsencode(current), IN_CREATE | IN_MOVED_TO | IN_ONLYDIR)
            if wd < 0:
                err = ctypes.get_errno()
                if err == errno.ENOSPC:
                    self.unwatched += 1
                    if self.unwatched == 1:  # once: every later mkdir would repeat it
                        log.error(
                            "cgroup_watch_limit",
                            watched=len(self._paths),
                            advice="raise fs.inotify.max_user_watches; cgroups below unwatched ones are "
                            "resolved at the next reload only",
                        )
                    return
                continue  # removed meanwhile
            self._paths[wd] = current
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(current, d))]

    def _relative(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def _matching(self, created: list[str]) -> list[str]:
        """The new directories (and the ones below them) that a pattern matches."""
        found = []
        for top in created:
            for current, _, _ in os.walk(top):
                rel = self._relative(current)
                if any(glob_match(p, rel) for p in self.patterns):
                    found.append(rel)
        return found

    def _drain(self) -> tuple[list[str], bool]:
        """Read what inotify has: the created directories, and whether it overflowed."""
        created: list[str] = []
        overflow = False
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return created, overflow
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
                offset += _EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    overflow = True
                elif mask & IN_IGNORED:
                    self._paths.pop(wd, None)
                elif mask & IN_ISDIR and wd in self._paths:
                    path = os.path.join(self._paths[wd], os.fsdecode(name))
                    if os.path.isdir(path):
                        self._add(path)
                        created.append(path)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Watch until cancelled; reports ready once the whole tree is watched."""
        self._fd = _inotify_init()
        try:
            await anyio.to_thread.run_sync(self._add, self.root)
            log.info("cgroup_watch_started", directories=len(self._paths), patterns=self.patterns)
            task_status.started()
            while True:
                await anyio.wait_readable(self._fd)
                await anyio.sleep(SETTLE_S)
                created, overflow = self._drain()
                if overflow:
                    # Events were dropped: look at everything again (a rescan finds any match).
                    self.overflows += 1
                    self._paths.clear()
                    os.close(self._fd)
                    self._fd = _inotify_init()
                    await anyio.to_thread.run_sync(self._add, self.root)
                    created = [self.root]
                matched = await anyio.to_thread.run_sync(self._matching, created) if created else []
                if matched:
                    await self._on_match(matched)
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
