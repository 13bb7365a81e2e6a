"""Finding and mounting the pseudo filesystems BPF needs: bpffs for pins, tracefs for tracepoints."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import structlog

from loaders import errors

DEFAULT_BPFFS = "/sys/fs/bpf"
DEFAULT_TRACEFS = "/sys/kernel/tracing"
logger = structlog.get_logger("loaders.bpffs")


def mounts(fstype: str, mounts_file: str = "/proc/mounts") -> list[str]:
    """Return the mount points of filesystems of type ``fstype``, in mount order.

    Args:
        fstype: A filesystem type, e.g. ``"bpf"`` or ``"cgroup2"``.
        mounts_file: The mount table to read.
    """
    found: list[str] = []
    with open(mounts_file) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == fstype:
                found.append(_unescape(fields[1]))
    return found


def _unescape(path: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal.
    return path.encode().decode("unicode_escape") if "\\" in path else path


def is_mounted(path: str = DEFAULT_BPFFS, fstype: str = "bpf") -> bool:
    """True when ``path`` is a mount point of type ``fstype``."""
    return os.path.realpath(path) in {os.path.realpath(p) for p in mounts(fstype)}


def mount(source: str, target: str, fstype: str) -> None:
    """Mount a pseudo filesystem (``mount(2)``), creating ``target`` if needed.

    Raises:
        PermissionDenied: Not root (CAP_SYS_ADMIN is needed to mount).
        BpfError: mount(2) failed otherwise.
    """
    os.makedirs(target, exist_ok=True)
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        code = ctypes.get_errno()
        exc = errors.from_errno(f"mount -t {fstype} {source} {target}", code)
        if isinstance(exc, errors.PermissionDenied):
            exc.advice = "Run as root to mount it, or mount it at boot (fstab / systemd mount unit)"
        raise exc
    logger.info("filesystem_mounted", fstype=fstype, path=target)


def ensure_mounted(path: str = DEFAULT_BPFFS) -> str:
    """Make sure bpffs is mounted at ``path``, mounting it if absent.

    Args:
        path: Where bpffs should be.

    Returns:
        ``path``.
    """
    if not is_mounted(path, "bpf"):
        mount("bpf", path, "bpf")
    return path


def ensure_tracefs(path: str = DEFAULT_TRACEFS) -> str:
    """Make sure tracefs is mounted at ``path`` (needed to attach ``tp/`` programs), mounting it if absent.

    Returns:
        ``path``.
    """
    if not is_mounted(path, "tracefs"):
        mount("nodev", path, "tracefs")
    return path
