"""The native helper for policy swaps: sorting, nesting and writing 100k LPM nodes in C.

``loaders/objects/libtool_lpm.<machine>.so`` is built from ``loaders/csrc/lpm_tables.c`` and
committed, like the BPF objects. It needs no libc, so one build serves every Linux of its
architecture. Where it is absent (another architecture) or ``TOOL_NATIVE=0`` is set, :func:`get`
returns None and the callers do the same work in Python: the same bytes, about half a second
slower for 100k rules on the test VM (docs/performance.md).
"""

from __future__ import annotations

import errno
import os
import platform
import threading
from array import array
from dataclasses import dataclass
from importlib import resources
from typing import Any

import cffi

_CDEF = """
struct run { uint32_t start, end, length, group; };
struct pack_result { int64_t too_deep; uint32_t most; uint32_t most_at; };
struct sync_result { uint32_t deleted; uint32_t written; int32_t error; uint32_t failed; uint32_t phase; };
int tool_lpm_pack(const uint8_t *keys, const uint32_t *sizes, uint32_t n, uint32_t key_size, uint32_t rule_size,
                  uint32_t max_nesting, uint8_t *sorted, uint32_t *order, uint8_t *values, uint64_t *work,
                  struct run *runs, uint16_t *parent_len, uint16_t *nesting, struct pack_result *res);
int32_t tool_lpm_sync(int fd, const uint8_t *old_keys, const uint8_t *old_values, uint32_t n_old,
                      const uint8_t *new_keys, const uint8_t *new_values, uint32_t n_new, uint32_t key_size,
                      uint32_t slot_offset, uint8_t slot, uint64_t value_add, struct sync_result *res);
"""

BUILT_FOR = ("x86_64",)
"""Architectures with a committed build (``platform.machine()`` names); elsewhere the Python path runs."""

ffi = cffi.FFI()
ffi.cdef(_CDEF)

_lock = threading.Lock()
_lib: Any = None
_tried = False


def library_path() -> str:
    """Where this architecture's build of the helper lives (it may not exist)."""
    return str(resources.files("loaders").joinpath("objects", f"libtool_lpm.{platform.machine()}.so"))


def use_native(value: str | None) -> bool:
    """Read ``TOOL_NATIVE``: unset or ``1`` uses the helper, ``0`` the Python code.

    Raises:
        ValueError: any other value, naming the variable and what it takes.
    """
    if value is None or value == "1":
        return True
    if value == "0":
        return False
    raise ValueError(
        f"environment variable TOOL_NATIVE={value!r}: "
        "expected 0 (policy swaps in Python) or 1 (the native helper, the default)"
    )


def get() -> Native | None:
    """The helper, or None where it is missing or ``TOOL_NATIVE=0`` turns it off (read on every call).

    Raises:
        ValueError: ``TOOL_NATIVE`` is neither 0 nor 1 (the agent's configuration checks it at start).
    """
    global _lib, _tried
    if not use_native(os.environ.get("TOOL_NATIVE")):
        return None
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _lib = ffi.dlopen(library_path())
                except OSError:
                    _lib = None
                _tried = True
    return None if _lib is None else Native(_lib)


@dataclass(frozen=True)
class Packed:
    """A policy's LPM nodes ready to write (see tool_lpm_pack in lpm_tables.c)."""

    keys: bytes  # the node keys in key order, packed
    values: bytes  # each node's tool_lpm_value for slot 0, packed, in the same order
    order: list[int]  # for each node in key order, its index in the caller's order
    most: int  # the most rules one node has ...
    most_at: int  # ... and the first node (key order) that has them
    too_deep: int  # the first node (key order) nested in ``max_nesting`` or more others, or -1


@dataclass(frozen=True)
class Synced:
    """What :meth:`Native.sync` did: counts, and where it stopped if it failed."""

    deleted: int
    written: int
    error: int  # 0, or a negative errno
    failed: int  # the index of the failed key in the old (phase 1) or new (phase 2) keys
    phase: int


@dataclass(frozen=True)
class Native:
    """Calls into the helper; the buffers are the packed keys and values the Python side has."""

    lib: Any

    def pack(self, keys: bytes, sizes: array[int], key_size: int, rule_size: int, max_nesting: int) -> Packed:
        """Sort packed LPM keys, link each to its enclosing key and make their values.

        Args:
            keys: the node keys, packed end to end in any order.
            sizes: the byte size of each node's packed rules, in the same order ('I' array).
            key_size: bytes per key (a whole number of 8-byte words).
            rule_size: bytes per packed rule.
            max_nesting: how many enclosing nodes make a node too deep.

        Raises:
            ValueError: sizes the helper does not handle.
        """
        n = len(sizes)
        if len(keys) != n * key_size:
            raise ValueError(f"native helper: {len(keys)} bytes of keys for {n} nodes of {key_size} bytes")
        sorted_keys = ffi.new("uint8_t[]", len(keys))
        order = ffi.new("uint32_t[]", n)
        values = ffi.new("uint8_t[]", 8 * n)
        work = ffi.new("uint64_t[]", 2 * n * (key_size // 8 + 1))
        runs = ffi.new("struct run[]", max(n, 1))
        parent_len = ffi.new("uint16_t[]", n)
        nesting = ffi.new("uint16_t[]", n)
        res: Any = ffi.new("struct pack_result *")
        sizes_buf = ffi.from_buffer("uint32_t[]", sizes)
        err = self.lib.tool_lpm_pack(
            keys, sizes_buf, n, key_size, rule_size, max_nesting, sorted_keys, order, values, work, runs,
            parent_len, nesting, res,
        )  # fmt: skip
        if err:
            raise ValueError(f"native helper: cannot pack {n} keys of {key_size} bytes")
        return Packed(
            bytes(ffi.buffer(sorted_keys)),
            bytes(ffi.buffer(values)),
            array("I", bytes(ffi.buffer(order))).tolist(),
            res.most,
            res.most_at,
            res.too_deep,
        )

    def sync(
        self,
        fd: int,
        old: tuple[bytes, bytes],
        new: tuple[bytes, bytes],
        key_size: int,
        slot_offset: int,
        slot: int,
        value_add: int,
    ) -> Synced:
        """Make a trie that holds ``old`` (keys, values) hold ``new``, writing only the difference.

        Both are packed for slot 0 and sorted, as :meth:`pack` leaves them; ``fd`` -1 only counts.

        Raises:
            ValueError: buffers that are not whole keys and values, or keys out of order.
        """
        res: Any = ffi.new("struct sync_result *")
        old_keys, old_values = old
        new_keys, new_values = new
        for keys, values in (old, new):
            if len(keys) % key_size or len(values) != len(keys) // key_size * 8:
                raise ValueError(f"native helper: {len(keys)} bytes of keys and {len(values)} of values")
        self.lib.tool_lpm_sync(
            fd,
            old_keys,
            old_values,
            len(old_keys) // key_size,
            new_keys,
            new_values,
            len(new_keys) // key_size,
            key_size,
            slot_offset,
            slot,
            value_add,
            res,
        )
        if res.error == -errno.EINVAL and res.phase == 0:
            raise ValueError(f"native helper: keys not in ascending order, or a key size other than {key_size}")
        return Synced(res.deleted, res.written, res.error, res.failed, res.phase)
