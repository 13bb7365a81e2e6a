"""cgroup v2 helpers: find the hierarchy, identify cgroups, and make scratch cgroups for tests."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import uuid
from collections.abc import Callable, Iterator

from loaders import bpffs, errors


def cgroup2_root(mounts_file: str = "/proc/mounts") -> str:
    """Return the mount point of the cgroup v2 hierarchy.

    It is ``/sys/fs/cgroup`` on unified systems and ``/sys/fs/cgroup/unified`` on hybrid ones.

    Raises:
        NoCgroup2: No cgroup2 filesystem is mounted.
    """
    found = bpffs.mounts("cgroup2", mounts_file)
    if not found:
        raise errors.NoCgroup2("no cgroup2 mount found in /proc/mounts")
    return found[0]


def cgroup_id(path: str) -> int:
    """Return the id of the cgroup at ``path`` (its inode number, as ``bpf_get_current_cgroup_id()``)."""
    return os.stat(path).st_ino


def move_pid(path: str, pid: int) -> None:
    """Move process ``pid`` (0: the caller) into the cgroup at ``path``."""
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(f"{pid}\n")


def enter(path: str) -> Callable[[], None]:
    """Return a ``preexec_fn`` for ``subprocess`` that moves the child into ``path`` before it runs.

    The child is in the cgroup from its first instruction of the new program, so no race.
    """
    procs = os.path.join(path, "cgroup.procs").encode()

    def preexec() -> None:
        fd = os.open(procs, os.O_WRONLY)
        try:
            os.write(fd, b"0\n")
        finally:
            os.close(fd)

    return preexec


def pids(path: str) -> list[int]:
    """Return the pids in the cgroup at ``path``."""
    with open(os.path.join(path, "cgroup.procs")) as f:
        return [int(line) for line in f if line.strip()]


def _wait_unpopulated(path: str, timeout_ms: int) -> bool:
    """Wait until ``cgroup.events`` says ``populated 0`` (the file signals POLLPRI on change)."""
    events = os.path.join(path, "cgroup.events")
    with open(events) as f:
        poller = select.poll()
        poller.register(f.fileno(), select.POLLPRI | select.POLLERR)
        while True:
            f.seek(0)
            if "populated 0" in f.read():
                return True
            if not poller.poll(timeout_ms):
                f.seek(0)
                return "populated 0" in f.read()


def remove(path: str, timeout_ms: int = 5000) -> None:
    """Empty and remove the cgroup at ``path``: move its processes to the parent, kill any that stay.

    Args:
        path: The cgroup directory (leaf).
        timeout_ms: How long to wait for killed processes to leave.
    """
    parent = os.path.dirname(path.rstrip("/"))
    for pid in pids(path):
        try:
            move_pid(parent, pid)
        except OSError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if not _wait_unpopulated(path, timeout_ms):
        for pid in pids(path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_unpopulated(path, timeout_ms)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def scratch_cgroup(prefix: str = "tooltest") -> Iterator[str]:
    """Create a child cgroup under the cgroup2 root and remove it afterwards, even on failure.

    Attach test programs here and move only child processes in (see :func:`enter`); never the
    root cgroup.

    Args:
        prefix: Start of the directory name (a unique suffix is added).

    Yields:
        The cgroup's path.
    """
    path = os.path.join(cgroup2_root(), f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(path)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            raise errors.PermissionDenied(f"mkdir {path}", exc.errno) from exc
        raise
    try:
        yield path
    finally:
        remove(path)
