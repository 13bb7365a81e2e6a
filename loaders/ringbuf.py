"""Consumer of BPF ring buffers: one libbpf ring_buffer over one or more maps, pollable from anyio."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import anyio

from loaders import errors
from loaders._ffi import call, check, ffi, lib
from loaders.maps import Map

# A sample callback receives the record. With copy=True it is a fresh ``bytes``; with copy=False a
# cffi buffer that is valid only during the call (copy what you keep).
SampleCallback = Callable[[Any], None]
_CALLBACK_FAILED = -1


class RingBuffer:
    """Reads records from ring buffer maps and hands each to its map's callback.

    A Python exception raised by a callback stops the current :meth:`consume`/:meth:`poll`
    (the record that raised counts as consumed) and is re-raised from it.

    Args:
        maps: ``{label: (ring buffer map, callback)}``; the label only names the map in errors.
        copy: Pass each record as ``bytes`` (default), or as a zero-copy cffi buffer.
    """

    def __init__(self, maps: Mapping[str, tuple[Map, SampleCallback]], *, copy: bool = True) -> None:
        if not maps:
            raise ValueError("RingBuffer needs at least one map")
        libbpf = lib()
        self._lib = libbpf
        self._pending: BaseException | None = None
        self._callbacks: list[Any] = []  # ffi.callback objects: alive as long as the ring_buffer
        self._maps = [m for m, _ in maps.values()]  # keep the maps (and their objects) alive
        self._ptr: Any = None
        for label, (rb_map, callback) in maps.items():
            c_callback = ffi.callback("ring_buffer_sample_fn", self._adapter(callback, copy))
            self._callbacks.append(c_callback)
            if self._ptr is None:
                ptr = call(
                    f"ring_buffer__new({label})",
                    libbpf.ring_buffer__new,
                    rb_map.fd,
                    c_callback,
                    ffi.NULL,
                    ffi.NULL,
                )
                self._ptr = ffi.gc(ptr, libbpf.ring_buffer__free)
            else:
                call(
                    f"ring_buffer__add({label})",
                    libbpf.ring_buffer__add,
                    self._ptr,
                    rb_map.fd,
                    c_callback,
                    ffi.NULL,
                )

    def _adapter(self, callback: SampleCallback, copy: bool) -> Callable[[Any, Any, int], int]:
        buffer = ffi.buffer

        if copy:

            def on_sample(_ctx: Any, data: Any, size: int) -> int:
                try:
                    callback(buffer(data, size)[:])
                except BaseException as exc:  # never let it escape into C
                    self._pending = exc
                    return _CALLBACK_FAILED
                return 0
        else:

            def on_sample(_ctx: Any, data: Any, size: int) -> int:
                try:
                    callback(buffer(data, size))
                except BaseException as exc:
                    self._pending = exc
                    return _CALLBACK_FAILED
                return 0

        return on_sample

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Free the consumer (idempotent); the maps stay."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            ffi.release(ptr)

    def _pointer(self) -> Any:
        if self._ptr is None:
            raise errors.BpfError("ring buffer is closed", advice="Create a new RingBuffer")
        return self._ptr

    def fileno(self) -> int:
        """The epoll fd that becomes readable when any of the maps has data."""
        return int(call("ring_buffer__epoll_fd", self._lib.ring_buffer__epoll_fd, self._pointer()))

    def _finish(self, what: str, result: int) -> int:
        pending, self._pending = self._pending, None
        if pending is not None:
            raise pending
        return int(check(what, result))

    def consume(self) -> int:
        """Hand every available record to its callback without waiting.

        Returns:
            How many records were consumed.

        Raises:
            BaseException: Whatever a callback raised.
            BpfError: libbpf failed.
        """
        return self._finish("ring_buffer__consume", self._lib.ring_buffer__consume(self._pointer()))

    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` (-1: forever) for data, then consume it (releases the GIL).

        Returns:
            How many records were consumed (0 on timeout).
        """
        return self._finish("ring_buffer__poll", self._lib.ring_buffer__poll(self._pointer(), timeout_ms))


async def wait_readable(rb: RingBuffer) -> None:
    """Wait, without blocking the event loop, until ``rb`` has data; then call ``rb.consume()``.

    Args:
        rb: The ring buffer to wait on.
    """
    await anyio.wait_readable(rb.fileno())
