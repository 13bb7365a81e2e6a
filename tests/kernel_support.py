"""Shared gate for tests that need a BPF-capable kernel: skip with a reason, or fail under REQUIRE_BPF=1."""

from __future__ import annotations

import functools
import os
import platform
from typing import Any

import pytest


@functools.cache
def kernel_unavailable_reason() -> str | None:
    """Return why kernel tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) to load BPF programs"
    try:
        from loaders import errors
        from loaders._ffi import ffi, lib
    except ImportError as exc:  # pragma: no cover - broken install
        return f"loaders cannot be imported: {exc}"
    try:
        libbpf = lib()
    except errors.LibbpfMissing as exc:
        return str(exc)
    bpf_map_type_array = 2
    probe = libbpf.libbpf_probe_bpf_map_type(bpf_map_type_array, ffi.NULL)
    if probe != 1:
        return f"the bpf() syscall does not work here (probe returned {probe})"
    return None


def require_kernel() -> None:
    """Skip the calling test when the kernel cannot run BPF; fail instead when ``REQUIRE_BPF=1``."""
    reason = kernel_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("REQUIRE_BPF") == "1":
        pytest.fail(f"REQUIRE_BPF=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def require_native() -> Any:
    """The native helper, on an architecture it is built for; elsewhere the test is skipped with the reason.

    A missing library on an architecture it is committed for fails: that is a broken checkout.
    """
    from loaders import native

    helper = native.get()
    if helper is not None:
        return helper
    if platform.machine() not in native.BUILT_FOR:
        pytest.skip(f"no native helper is built for {platform.machine()}: the Python writer runs there")
    pytest.fail(f"the native helper is missing or does not load: {native.library_path()} (make -C loaders/csrc)")
