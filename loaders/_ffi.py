"""cffi ABI-mode handle on libbpf.so.1 and the one choke point through which every libbpf call goes."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from importlib import resources
from typing import Any

import cffi

from loaders import errors

LIBBPF_SONAME = "libbpf.so.1"
MIN_LIBBPF = (1, 1)

# Header fragments, loaded in this fixed order (later ones use types declared earlier).
CDEF_FRAGMENTS = ("log.h", "object.h", "program.h", "map.h", "ringbuf.h", "link.h")

ffi = cffi.FFI()
for _fragment in CDEF_FRAGMENTS:
    ffi.cdef(resources.files("loaders").joinpath("cdefs", _fragment).read_text())

_lock = threading.Lock()
_lib: Any = None
_libc: Any = None


def lib() -> Any:
    """Return the opened libbpf, opening it (and routing its log to structlog) on first use.

    Returns:
        The cffi library object for libbpf.so.1.

    Raises:
        LibbpfMissing: libbpf.so.1 cannot be opened or is older than 1.1.
    """
    global _lib, _libc
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None:
            try:
                opened: Any = ffi.dlopen(LIBBPF_SONAME)
            except OSError as exc:
                raise errors.LibbpfMissing(f"cannot open {LIBBPF_SONAME} ({exc})") from exc
            version = (opened.libbpf_major_version(), opened.libbpf_minor_version())
            if version < MIN_LIBBPF:
                raise errors.LibbpfMissing(f"libbpf {version[0]}.{version[1]} is too old, need >= 1.1")
            _libc = ffi.dlopen(None)
            from loaders import log  # the print callback needs libc; import here to avoid a cycle

            log.install(opened, _libc)
            _lib = opened
    return _lib


def libc() -> Any:
    """Return the C library (for ``vsnprintf``), after :func:`lib` has opened libbpf."""
    lib()
    return _libc


def call(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call a libbpf function and turn its failure into a :class:`errors.BpfError`.

    libbpf 1.x reports failure as a negative errno for ``int`` results and as NULL with
    ``errno`` set for pointer results; both are handled here.

    Args:
        what: Names the operation in the error message.
        fn: The libbpf function (an attribute of :func:`lib`).
        *args: Its arguments.

    Returns:
        The function's result (an ``int`` >= 0 or a non-NULL pointer).

    Raises:
        BpfError: The subclass that matches the errno.
    """
    return check(what, fn(*args))


def check(what: str, result: Any) -> Any:
    """Check a libbpf result already obtained (see :func:`call`); read ``ffi.errno`` right after the call.

    Args:
        what: Names the operation in the error message.
        result: What the libbpf function returned.

    Returns:
        ``result`` when it is not a failure.

    Raises:
        BpfError: The subclass that matches the errno.
    """
    if isinstance(result, int):
        if result < 0:
            raise errors.from_errno(what, -result)
        return result
    if result == ffi.NULL:
        raise errors.from_errno(what, ffi.errno or errno.EINVAL)
    return result


def string(ptr: Any, length: int = -1) -> str:
    """Decode a C string (``""`` for NULL), at most ``length`` bytes when given."""
    if ptr == ffi.NULL:
        return ""
    raw = ffi.string(ptr, length)
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
