"""BPF maps: element access, iteration, batches and pinning, for a map of an object or a pinned one."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from loaders import errors
from loaders._ffi import call, check, ffi, lib

if TYPE_CHECKING:
    from loaders.object import BpfObject

# Kernel map type numbers (enum bpf_map_type in linux/bpf.h) that change how values are laid out.
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE = 21
BPF_MAP_TYPE_RINGBUF = 27
BPF_F_NO_PREALLOC = 1  # map_flags: allocate entries as they are added (required for LPM tries)
PERCPU_TYPES = frozenset(
    {
        BPF_MAP_TYPE_PERCPU_HASH,
        BPF_MAP_TYPE_PERCPU_ARRAY,
        BPF_MAP_TYPE_LRU_PERCPU_HASH,
        BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE,
    }
)
ARRAY_TYPES = frozenset({BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY})

BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
_BATCH_UNSUPPORTED = frozenset({errors.ENOTSUPP, errno.EOPNOTSUPP, errno.ENOSYS})


def _possible_cpus() -> int:
    return int(call("libbpf_num_possible_cpus", lib().libbpf_num_possible_cpus))


class Map:
    """A BPF map: part of a :class:`BpfObject`, opened from a bpffs pin, or made by :meth:`create`.

    Keys and values are ``bytes`` laid out as the kernel sees them (encode with ``struct``).
    """

    def __init__(
        self,
        *,
        name: str,
        fd: int | None,
        ptr: Any,
        owner: BpfObject | None,
        map_type: int,
        key_size: int,
        value_size: int,
        max_entries: int,
    ) -> None:
        """Use :meth:`BpfObject.map` or :meth:`open_pinned` instead."""
        self.name = name
        self._fd = fd  # owned here (pinned map) when ptr is None
        self._ptr = ptr  # struct bpf_map * owned by the object
        self._owner = owner
        self._type = map_type
        self._key_size = key_size
        self._value_size = value_size
        self._max_entries = max_entries
        self._lib = lib()

    @classmethod
    def _from_object(cls, owner: BpfObject, ptr: Any, name: str) -> Map:
        libbpf = lib()
        return cls(
            name=name,
            fd=None,
            ptr=ptr,
            owner=owner,
            map_type=int(libbpf.bpf_map__type(ptr)),
            key_size=0,
            value_size=0,
            max_entries=0,
        )

    @classmethod
    def open_pinned(cls, path: str | os.PathLike[str]) -> Map:
        """Open a map pinned in bpffs; usable without the object that created it.

        Args:
            path: The pin path.

        Raises:
            NotFound: Nothing is pinned there.
        """
        path = os.fspath(path)
        fd = int(call(f"bpf_obj_get({path})", lib().bpf_obj_get, path.encode()))
        try:
            info = _fdinfo(fd)
            return cls(
                name=os.path.basename(path),
                fd=fd,
                ptr=None,
                owner=None,
                map_type=info["map_type"],
                key_size=info["key_size"],
                value_size=info["value_size"],
                max_entries=info["max_entries"],
            )
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def create(
        cls, name: str, map_type: int, key_size: int, value_size: int, max_entries: int, map_flags: int = 0
    ) -> Map:
        """Create a map that belongs to no object (closed by :meth:`close`, freed with its last reference).

        Args:
            name: The kernel's name for it (at most 15 bytes are kept).
            map_type: A ``BPF_MAP_TYPE_*`` number.
            key_size: Bytes per key.
            value_size: Bytes per value.
            max_entries: Capacity.
            map_flags: ``BPF_F_*`` flags.

        Raises:
            BpfError: The kernel refused it.
        """
        size = ffi.sizeof("struct bpf_map_create_opts")
        opts = ffi.new("struct bpf_map_create_opts *", {"sz": size, "map_flags": map_flags})
        libbpf = lib()
        fd = int(
            call(
                f"bpf_map_create({name})",
                libbpf.bpf_map_create,
                map_type,
                name.encode()[:15],
                key_size,
                value_size,
                max_entries,
                opts,
            )
        )
        return cls(
            name=name,
            fd=fd,
            ptr=None,
            owner=None,
            map_type=map_type,
            key_size=key_size,
            value_size=value_size,
            max_entries=max_entries,
        )

    def __enter__(self) -> Map:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Map(name={self.name!r}, type={self._type})"

    def close(self) -> None:
        """Close a pinned or created map's fd (idempotent); a no-op for a map owned by an object."""
        fd, self._fd = self._fd, None
        if fd is not None and self._ptr is None:
            os.close(fd)

    # -- attributes ----------------------------------------------------------------------------

    @property
    def fd(self) -> int:
        """The map's file descriptor (after load for object maps)."""
        if self._ptr is not None:
            self._owner._pointer()  # type: ignore[union-attr]  # raises if the object was closed
            return int(call(f"bpf_map__fd({self.name})", self._lib.bpf_map__fd, self._ptr))
        if self._fd is None:
            raise errors.BpfError(f"map {self.name!r} is closed", advice="Open the pin again")
        return self._fd

    @property
    def type(self) -> int:
        """The kernel map type (``enum bpf_map_type``)."""
        return self._type

    @property
    def key_size(self) -> int:
        """Bytes per key."""
        return int(self._lib.bpf_map__key_size(self._ptr)) if self._ptr is not None else self._key_size

    @property
    def value_size(self) -> int:
        """Bytes per value (per CPU for per-CPU maps)."""
        return int(self._lib.bpf_map__value_size(self._ptr)) if self._ptr is not None else self._value_size

    @property
    def max_entries(self) -> int:
        """Capacity of the map."""
        return int(self._lib.bpf_map__max_entries(self._ptr)) if self._ptr is not None else self._max_entries

    @property
    def is_percpu(self) -> bool:
        """True for per-CPU maps (use :meth:`lookup_percpu`)."""
        return self._type in PERCPU_TYPES

    def set_max_entries(self, n: int) -> None:
        """Resize the map before its object is loaded.

        Raises:
            BpfError: Already loaded (``EBUSY``) or not part of an object.
        """
        if self._ptr is None:
            raise errors.BpfError(f"map {self.name!r} is not part of an object", errno.EINVAL)
        call(f"bpf_map__set_max_entries({self.name})", self._lib.bpf_map__set_max_entries, self._ptr, n)

    # -- elements ------------------------------------------------------------------------------

    def _key(self, key: bytes) -> bytes:
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name!r} keys are {self.key_size} bytes, got {len(key)}")
        return key

    def lookup(self, key: bytes) -> bytes | None:
        """Return the value stored under ``key``, or None.

        Raises:
            ValueError: Wrong key size, or a per-CPU map (use :meth:`lookup_percpu`).
        """
        if self.is_percpu:
            raise ValueError(f"map {self.name!r} is per-CPU: use lookup_percpu()")
        value = ffi.new("char[]", self.value_size)
        result = self._lib.bpf_map_lookup_elem(self.fd, self._key(key), value)
        if result == -errno.ENOENT:
            return None
        check(f"bpf_map_lookup_elem({self.name})", result)
        return ffi.buffer(value)[:]  # type: ignore[no-any-return]

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        """Return one value per possible CPU for ``key`` in a per-CPU map, or None.

        Raises:
            ValueError: Wrong key size.
        """
        size = self.value_size
        stride = (size + 7) & ~7
        cpus = _possible_cpus()
        value = ffi.new("char[]", stride * cpus)
        result = self._lib.bpf_map_lookup_elem(self.fd, self._key(key), value)
        if result == -errno.ENOENT:
            return None
        check(f"bpf_map_lookup_elem({self.name})", result)
        raw = ffi.buffer(value)[:]
        return [raw[i * stride : i * stride + size] for i in range(cpus)]

    def _value_bytes(self) -> int:
        """Bytes one value occupies in a syscall buffer (all CPUs for per-CPU maps)."""
        if self.is_percpu:
            return ((self.value_size + 7) & ~7) * _possible_cpus()
        return self.value_size

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        """Store ``value`` under ``key``.

        For per-CPU maps ``value`` holds one 8-byte-aligned slot per possible CPU.

        Args:
            key: The key bytes.
            value: The value bytes.
            flags: ``BPF_ANY``, ``BPF_NOEXIST`` or ``BPF_EXIST``.
        """
        if len(value) != self._value_bytes():
            raise ValueError(f"map {self.name!r} values are {self._value_bytes()} bytes, got {len(value)}")
        call(
            f"bpf_map_update_elem({self.name})",
            self._lib.bpf_map_update_elem,
            self.fd,
            self._key(key),
            value,
            flags,
        )

    def delete(self, key: bytes) -> bool:
        """Remove ``key``; return False when it was absent."""
        result = self._lib.bpf_map_delete_elem(self.fd, self._key(key))
        if result == -errno.ENOENT:
            return False
        check(f"bpf_map_delete_elem({self.name})", result)
        return True

    def keys(self) -> Iterator[bytes]:
        """Iterate over the keys (``bpf_map_get_next_key``); not a snapshot."""
        fd = self.fd
        size = self.key_size
        current = ffi.new("char[]", size)
        following = ffi.new("char[]", size)
        previous: Any = ffi.NULL
        while True:
            result = self._lib.bpf_map_get_next_key(fd, previous, following)
            if result == -errno.ENOENT:
                return
            check(f"bpf_map_get_next_key({self.name})", result)
            key = ffi.buffer(following)[:]
            yield key
            ffi.memmove(current, following, size)
            previous = current

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Iterate over ``(key, value)`` pairs of a map that is not per-CPU."""
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:  # deleted meanwhile
                yield key, value

    # -- batches -------------------------------------------------------------------------------

    def update_batch(self, keys: Sequence[bytes], values: Sequence[bytes], flags: int = BPF_ANY) -> None:
        """Store many entries in one syscall, or one by one where the map has no batch support.

        LPM tries, for one, do not support batch operations; the fallback is transparent.

        Args:
            keys: Key bytes.
            values: Value bytes, same length as ``keys``.
            flags: Element flags, as for :meth:`update`.
        """
        if len(keys) != len(values):
            raise ValueError("keys and values differ in length")
        if not keys:
            return
        key_size, value_size = self.key_size, self._value_bytes()
        if any(len(k) != key_size for k in keys) or any(len(v) != value_size for v in values):
            raise ValueError(f"map {self.name!r} needs {key_size}-byte keys and {value_size}-byte values")
        count = ffi.new("uint32_t *", len(keys))
        opts = ffi.new("uint64_t[3]", [24, 0, flags])  # struct bpf_map_batch_opts {sz, elem_flags, flags}
        result = self._lib.bpf_map_update_batch(self.fd, b"".join(keys), b"".join(values), count, opts)
        if -result in _BATCH_UNSUPPORTED:
            self._update_each(keys, values, flags)
            return
        check(f"bpf_map_update_batch({self.name})", result)

    def update_packed(self, keys: bytes, values: bytes, flags: int = BPF_ANY) -> None:
        """Like :meth:`update_batch`, for keys and values already packed end to end in two buffers.

        Args:
            keys: ``n`` keys, each ``key_size`` bytes, one after the other.
            values: ``n`` values in the same order.
            flags: Element flags, as for :meth:`update`.

        Raises:
            ValueError: The buffers do not hold the same whole number of keys and values.
        """
        key_size, value_size = self.key_size, self._value_bytes()
        count_keys, rest = divmod(len(keys), key_size)
        if rest or len(values) != count_keys * value_size:
            raise ValueError(f"map {self.name!r} needs {key_size}-byte keys and as many {value_size}-byte values")
        if not count_keys:
            return
        count = ffi.new("uint32_t *", count_keys)
        opts = ffi.new("uint64_t[3]", [24, 0, flags])  # struct bpf_map_batch_opts {sz, elem_flags, flags}
        result = self._lib.bpf_map_update_batch(self.fd, keys, values, count, opts)
        if -result in _BATCH_UNSUPPORTED:
            self._update_each(
                [keys[i : i + key_size] for i in range(0, len(keys), key_size)],
                [values[i : i + value_size] for i in range(0, len(values), value_size)],
                flags,
            )
            return
        check(f"bpf_map_update_batch({self.name})", result)

    def delete_packed(self, keys: bytes) -> int:
        """Like :meth:`delete_batch`, for keys already packed end to end in one buffer.

        Returns:
            How many keys were deleted.
        """
        key_size = self.key_size
        if len(keys) % key_size:
            raise ValueError(f"map {self.name!r} keys are {key_size} bytes")
        if not keys:
            return 0
        count = ffi.new("uint32_t *", len(keys) // key_size)
        result = self._lib.bpf_map_delete_batch(self.fd, keys, count, ffi.NULL)
        if result == 0:
            return int(count[0])
        if -result in _BATCH_UNSUPPORTED or result == -errno.ENOENT:
            return self._delete_each([keys[i : i + key_size] for i in range(0, len(keys), key_size)])
        check(f"bpf_map_delete_batch({self.name})", result)
        return int(count[0])

    def _update_each(self, keys: Sequence[bytes], values: Sequence[bytes], flags: int) -> None:
        """One ``bpf_map_update_elem`` per entry, sizes already checked: the loop holds no Python wrapper."""
        fd, update = self.fd, self._lib.bpf_map_update_elem
        for key, value in zip(keys, values, strict=True):
            result = update(fd, key, value, flags)
            if result < 0:
                check(f"bpf_map_update_elem({self.name})", result)

    def _delete_each(self, keys: Sequence[bytes]) -> int:
        """One ``bpf_map_delete_elem`` per key, sizes already checked; absent keys are skipped."""
        fd, delete = self.fd, self._lib.bpf_map_delete_elem
        deleted = 0
        for key in keys:
            result = delete(fd, key)
            if result == 0:
                deleted += 1
            elif result != -errno.ENOENT:
                check(f"bpf_map_delete_elem({self.name})", result)
        return deleted

    def delete_batch(self, keys: Sequence[bytes]) -> int:
        """Delete many keys, falling back to one by one; absent keys are skipped in the fallback.

        Returns:
            How many keys were deleted.
        """
        if not keys:
            return 0
        if any(len(k) != self.key_size for k in keys):
            raise ValueError(f"map {self.name!r} keys are {self.key_size} bytes")
        count = ffi.new("uint32_t *", len(keys))
        result = self._lib.bpf_map_delete_batch(self.fd, b"".join(keys), count, ffi.NULL)
        if result == 0:
            return int(count[0])
        if -result in _BATCH_UNSUPPORTED or result == -errno.ENOENT:
            return self._delete_each(keys)
        check(f"bpf_map_delete_batch({self.name})", result)
        return int(count[0])

    def clear(self) -> None:
        """Remove every entry (array maps cannot delete: their values are zeroed instead)."""
        if self._type in ARRAY_TYPES:
            zero = bytes(self._value_bytes())
            for index in range(self.max_entries):
                self.update(index.to_bytes(4, "little"), zero)
            return
        self.delete_batch(list(self.keys()))

    # -- pinning -------------------------------------------------------------------------------

    def pin(self, path: str | os.PathLike[str]) -> None:
        """Pin the map at ``path`` in bpffs so it outlives this process and can be re-opened."""
        path = os.fspath(path)
        call(f"bpf_obj_pin({path})", self._lib.bpf_obj_pin, self.fd, path.encode())

    def unpin(self, path: str | os.PathLike[str]) -> None:
        """Remove the pin at ``path``."""
        os.unlink(path)


def _fdinfo(fd: int) -> dict[str, int]:
    """Read a map's attributes from /proc/self/fdinfo (avoids struct bpf_map_info layouts)."""
    fields: dict[str, int] = {}
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            name, _, value = line.partition(":")
            value = value.strip()
            if name in ("map_type", "key_size", "value_size", "max_entries", "map_flags"):
                fields[name] = int(value, 16) if value.startswith("0x") else int(value)
    if "map_type" not in fields:
        raise errors.BpfError(f"fd {fd} is not a BPF map", errno.EINVAL, "Pass the pin path of a map")
    return fields
