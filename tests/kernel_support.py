"""Shared gate for tests that need a BPF-capable kernel: skip with a reason, or fail under REQUIRE_BPF=1."""

from __future__ import annotations

import functools
import os

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
