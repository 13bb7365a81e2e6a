"""Routes libbpf's own log into structlog and lets a caller capture it (for verifier errors)."""

from __future__ import annotations

import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from loaders._ffi import ffi, string

LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2
_FIRST_TRY = 1024
_VA_LIST_TAG_SIZE = 24  # x86_64 __va_list_tag: gp_offset, fp_offset, overflow_arg_area, reg_save_area

logger = structlog.get_logger("loaders.libbpf")
_local = threading.local()
_callback: Any = None  # kept alive for the life of the process: libbpf holds the pointer


class _Formatter:
    """Expands libbpf's (fmt, va_list) with libc's vsnprintf."""

    def __init__(self, libc: Any) -> None:
        self._libc = libc
        self._can_format = platform.machine() in ("x86_64", "AMD64")
        self._small = ffi.new("char[]", _FIRST_TRY)
        self._tag_copy = ffi.new("char[]", _VA_LIST_TAG_SIZE)

    def format(self, fmt: Any, ap: Any) -> str:
        if not self._can_format:  # va_list is not a pointer elsewhere: keep the format string only
            return string(fmt)
        # vsnprintf consumes the va_list: format from a copy first (va_copy on x86_64 is a memcpy).
        ffi.memmove(self._tag_copy, ap, _VA_LIST_TAG_SIZE)
        needed = self._libc.vsnprintf(self._small, _FIRST_TRY, fmt, self._tag_copy)
        if needed < 0:
            return string(fmt)
        if needed < _FIRST_TRY:
            return string(self._small, needed)
        big = ffi.new("char[]", needed + 1)
        self._libc.vsnprintf(big, needed + 1, fmt, ap)
        return string(big, needed)


def install(libbpf: Any, libc: Any) -> None:
    """Install the print callback into libbpf (called once, when libbpf is first opened).

    Args:
        libbpf: The opened libbpf.
        libc: The opened C library.
    """
    global _callback
    formatter = _Formatter(libc)
    lock = threading.Lock()  # the formatter's buffers are shared

    def on_print(level: int, fmt: Any, ap: Any) -> int:
        try:
            with lock:
                text = formatter.format(fmt, ap)
            _emit(level, text)
        except BaseException:  # never let anything escape into C
            pass
        return 0

    _callback = ffi.callback("libbpf_print_fn_t", on_print)
    libbpf.libbpf_set_print(_callback)


def _emit(level: int, text: str) -> None:
    captured: list[str] | None = getattr(_local, "captured", None)
    if captured is not None:
        captured.append(text)
    message = text.rstrip("\n")
    if level == LIBBPF_WARN:
        logger.warning("libbpf_log", level="warn", message=message)
    elif level == LIBBPF_INFO:
        logger.info("libbpf_log", level="info", message=message)
    else:
        logger.debug("libbpf_log", level="debug", message=message)


@contextmanager
def capture() -> Iterator[list[str]]:
    """Collect, in addition to logging, everything libbpf prints from this thread.

    Yields:
        The list that receives each printed chunk of text.
    """
    previous: list[str] | None = getattr(_local, "captured", None)
    captured: list[str] = []
    _local.captured = captured
    try:
        yield captured
    finally:
        _local.captured = previous
