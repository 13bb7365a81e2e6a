"""Consumer of BPF ring buffers: one libbpf ring_buffer over one or more maps, pollable from anyio."""

from __future__ import annotations

import mmap
import platform
import struct
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


# The ring buffer's record header (kernel uapi: BPF_RINGBUF_BUSY_BIT, _DISCARD_BIT, _HDR_SZ).
RINGBUF_BUSY_BIT = 1 << 31
RINGBUF_DISCARD_BIT = 1 << 30
RINGBUF_HDR_SZ = 8
_POS = struct.Struct("<Q")

# Reading the ring straight from shared memory needs the kernel's ordering (the producer
# publishes a record with a release store of its header; the reader must see the header before
# the data). Plain loads give that on x86-64 (total store order), not on weakly ordered CPUs,
# where the libbpf consumer (RingBuffer) and its acquire loads are used instead.
MMAP_READER_SAFE = platform.machine() in ("x86_64", "AMD64", "i686", "i386")


class RingReader:
    """A ring buffer map read directly from its shared memory, without a callback per record.

    The kernel maps the consumer position read-write, and the producer position followed by
    the data area (twice, back to back, so a record that wraps is contiguous) read-only. The
    caller walks the records between :meth:`window`'s bounds and hands the position it stopped
    at to :meth:`release`, which returns that space to the kernel. Nothing is copied.

    A record is 8 bytes of header (length, busy and discard bits, a page offset) and the
    record itself, rounded up to 8 bytes: see :func:`record_span`.

    Args:
        rb_map: A ``BPF_MAP_TYPE_RINGBUF`` map.

    Raises:
        BpfError: ``rb_map`` is not a ring buffer, or the kernel refused the mappings.
    """

    def __init__(self, rb_map: Map) -> None:
        from loaders.maps import BPF_MAP_TYPE_RINGBUF

        if rb_map.type != BPF_MAP_TYPE_RINGBUF:
            raise errors.BpfError(
                f"map {rb_map.name} is not a ring buffer (type {rb_map.type})",
                advice="Pass the sensors' events map",
            )
        self._map = rb_map  # keeps the fd open
        self.size = rb_map.max_entries
        self.mask = self.size - 1
        page = mmap.PAGESIZE
        try:
            self._consumer = mmap.mmap(rb_map.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._producer = mmap.mmap(
                rb_map.fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
            )
        except OSError as exc:
            raise errors.BpfError(
                f"mmap of ring buffer {rb_map.name}",
                errno=exc.errno or 0,
                advice="The kernel must allow mmap of BPF ring buffers (Linux 5.8+)",
            ) from exc
        self._page = page
        # The data area, from the first of its two mappings: offsets up to 2 * size are valid.
        self.data = memoryview(self._producer)[page:]

    def fileno(self) -> int:
        """The map's fd: readable (poll/epoll) while records are waiting."""
        return self._map.fd

    def window(self) -> tuple[int, int]:
        """The consumer and producer positions: records wait in [consumer, producer).

        Positions grow without wrapping; the record at position ``p`` starts at
        ``data[p & mask]``.
        """
        (consumer,) = _POS.unpack_from(self._consumer, 0)
        (producer,) = _POS.unpack_from(self._producer, 0)
        return consumer, producer

    def release(self, position: int) -> None:
        """Give the space before ``position`` back to the kernel (one aligned 8-byte store)."""
        _POS.pack_into(self._consumer, 0, position)

    def close(self) -> None:
        """Unmap (idempotent); the map stays."""
        if self._producer is not None:
            self.data.release()
            self._producer.close()
            self._consumer.close()
            self._producer = None  # type: ignore[assignment]

    def __enter__(self) -> RingReader:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def record_span(header_len: int) -> int:
    """Bytes a record takes in the ring: its header and length, rounded up to 8."""
    return ((header_len & ~(RINGBUF_BUSY_BIT | RINGBUF_DISCARD_BIT)) + RINGBUF_HDR_SZ + 7) & ~7
