"""A BPF object file: open it, tune it before load (globals, map sizes, autoload), load it, find its parts."""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any

from loaders import errors, log
from loaders._ffi import call, ffi, lib, string
from loaders.links import Link
from loaders.maps import Map

BTF_KIND_VAR = 14
BTF_KIND_DATASEC = 15
_RODATA = ".rodata"


class Program:
    """One program of a :class:`BpfObject`; valid while its object is open."""

    def __init__(self, obj: BpfObject, ptr: Any) -> None:
        self._obj = obj  # keeps the object (which owns ptr) alive
        self._ptr = ptr
        self.name: str = string(lib().bpf_program__name(ptr))
        self.section: str = string(lib().bpf_program__section_name(ptr))

    def __repr__(self) -> str:
        return f"Program(name={self.name!r}, section={self.section!r})"

    @property
    def fd(self) -> int:
        """The program's file descriptor (after load; owned by the object)."""
        return int(call(f"bpf_program__fd({self.name})", lib().bpf_program__fd, self._pointer()))

    @property
    def autoload(self) -> bool:
        """Whether :meth:`BpfObject.load` loads this program."""
        return bool(lib().bpf_program__autoload(self._pointer()))

    def set_autoload(self, autoload: bool) -> None:
        """Choose whether :meth:`BpfObject.load` loads this program (before load).

        Args:
            autoload: False to skip the program, e.g. when the kernel lacks its type.
        """
        call(
            f"bpf_program__set_autoload({self.name})",
            lib().bpf_program__set_autoload,
            self._pointer(),
            autoload,
        )

    def attach(self) -> Link:
        """Attach the program as its section says (tracepoints, ``tp_btf``, ``raw_tp``, ...).

        Returns:
            The link that keeps it attached.
        """
        ptr = call(f"bpf_program__attach({self.name})", lib().bpf_program__attach, self._pointer())
        return Link(ptr, owner=self)

    def attach_cgroup(self, cgroup_fd: int) -> Link:
        """Attach a cgroup program to the cgroup open as ``cgroup_fd`` (a ``bpf_link``).

        Args:
            cgroup_fd: A file descriptor of the cgroup directory (``os.open(path, os.O_RDONLY)``).

        Returns:
            The link that keeps it attached.
        """
        ptr = call(
            f"bpf_program__attach_cgroup({self.name})",
            lib().bpf_program__attach_cgroup,
            self._pointer(),
            cgroup_fd,
        )
        return Link(ptr, owner=self)

    def _pointer(self) -> Any:
        self._obj._pointer()  # raises when the object was closed
        return self._ptr


class BpfObject:
    """An opened (and later loaded) BPF object file; owns every program and map in it.

    Use :meth:`open`, tune, then :meth:`load`. Close it (or use ``with``) to free everything
    that is not pinned or held by a link.
    """

    def __init__(self, ptr: Any, keepalive: Any = None) -> None:
        """Wrap an opened ``struct bpf_object *`` (use :meth:`open` instead)."""
        self._ptr: Any = ffi.gc(ptr, lib().bpf_object__close)
        self._keepalive = keepalive  # the buffer libbpf reads from when opened from memory
        self.name: str = string(lib().bpf_object__name(ptr))
        self._programs: dict[str, Program] = {}
        self._maps: dict[str, Map] = {}
        self.loaded = False

    @classmethod
    def open(cls, source: str | os.PathLike[str] | bytes) -> BpfObject:
        """Open a BPF ELF object from a path or from its bytes.

        Args:
            source: A filesystem path, or the object file's contents.

        Returns:
            The opened, not yet loaded, object.

        Raises:
            NotFound: The file does not exist.
            BpfError: libbpf could not parse it (its log says why).
        """
        libbpf = lib()
        if isinstance(source, bytes):
            buf = ffi.from_buffer(source)
            ptr = call("bpf_object__open_mem", libbpf.bpf_object__open_mem, buf, len(source), ffi.NULL)
            return cls(ptr, keepalive=(source, buf))
        path = os.fspath(source)
        ptr = call(f"bpf_object__open_file({path})", libbpf.bpf_object__open_file, path.encode(), ffi.NULL)
        return cls(ptr)

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BpfObject(name={self.name!r}, loaded={self.loaded})"

    def close(self) -> None:
        """Free the object, its programs and maps (idempotent); pinned maps and live links stay."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            ffi.release(ptr)  # runs bpf_object__close now

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._ptr is None

    def _pointer(self) -> Any:
        if self._ptr is None:
            raise errors.BpfError(f"BPF object {self.name!r} is closed", advice="Open it again")
        return self._ptr

    # -- parts -------------------------------------------------------------------------------

    def program(self, name: str) -> Program:
        """Return the program whose C function is ``name``.

        Raises:
            NotFound: No such program.
        """
        found = self._programs.get(name)
        if found is None:
            ptr = lib().bpf_object__find_program_by_name(self._pointer(), name.encode())
            if ptr == ffi.NULL:
                raise errors.NotFound(f"no program {name!r} in {self.name}", advice="Check the name")
            found = self._programs[name] = Program(self, ptr)
        return found

    def programs(self) -> list[Program]:
        """Return every program of the object, in ELF order."""
        result: list[Program] = []
        ptr = lib().bpf_object__next_program(self._pointer(), ffi.NULL)
        while ptr != ffi.NULL:
            result.append(self.program(string(lib().bpf_program__name(ptr))))
            ptr = lib().bpf_object__next_program(self._pointer(), ptr)
        return result

    def map(self, name: str) -> Map:
        """Return the map called ``name`` (``".rodata"``, ``".bss"`` etc. for global data).

        Raises:
            NotFound: No such map.
        """
        found = self._maps.get(name)
        if found is None:
            ptr = lib().bpf_object__find_map_by_name(self._pointer(), name.encode())
            if ptr == ffi.NULL:
                raise errors.NotFound(f"no map {name!r} in {self.name}", advice="Check the name")
            found = self._maps[name] = Map._from_object(self, ptr, name)
        return found

    def maps(self) -> list[Map]:
        """Return every map of the object (including global-data maps)."""
        result: list[Map] = []
        ptr = lib().bpf_object__next_map(self._pointer(), ffi.NULL)
        while ptr != ffi.NULL:
            result.append(self.map(string(lib().bpf_map__name(ptr))))
            ptr = lib().bpf_object__next_map(self._pointer(), ptr)
        return result

    # -- before load ---------------------------------------------------------------------------

    def set_rodata(self, name: str, value: bytes) -> None:
        """Set a ``const volatile`` global by name before load.

        The variable is found through the ``.rodata`` datasec of the object's BTF; ``value``
        must have the variable's exact size (encode it with ``struct.pack`` in native order).

        Args:
            name: The C variable's name.
            value: Its new contents.

        Raises:
            NotFound: No such variable in ``.rodata``.
            ValueError: ``value`` has the wrong size.
        """
        offset, size = self._rodata_variable(name)
        if len(value) != size:
            raise ValueError(f"{name} is {size} bytes, got {len(value)}")
        self.set_rodata_bytes(offset, value)

    def has_rodata(self, name: str) -> bool:
        """Whether the object has a ``const volatile`` global called ``name``."""
        try:
            self._rodata_variable(name)
        except errors.NotFound:
            return False
        return True

    def set_rodata_bytes(self, offset: int, data: bytes) -> None:
        """Overwrite ``.rodata`` bytes at ``offset`` before load.

        Args:
            offset: Byte offset inside the ``.rodata`` section.
            data: The bytes to write there.
        """
        rodata = self.map(_RODATA)
        libbpf = lib()
        psize = ffi.new("size_t *")
        current = call("bpf_map__initial_value(.rodata)", libbpf.bpf_map__initial_value, rodata._ptr, psize)
        contents = bytearray(ffi.buffer(current, psize[0]))
        if offset < 0 or offset + len(data) > len(contents):
            raise ValueError(f".rodata is {len(contents)} bytes; cannot write {len(data)} at {offset}")
        contents[offset : offset + len(data)] = data
        call(
            "bpf_map__set_initial_value(.rodata)",
            libbpf.bpf_map__set_initial_value,
            rodata._ptr,
            ffi.from_buffer(contents),
            len(contents),
        )

    def _rodata_variable(self, name: str) -> tuple[int, int]:
        libbpf = lib()
        btf = call(f"bpf_object__btf({self.name})", libbpf.bpf_object__btf, self._pointer())
        sec_id = libbpf.btf__find_by_name_kind(btf, _RODATA.encode(), BTF_KIND_DATASEC)
        if sec_id < 0:
            raise errors.NotFound(
                f"{self.name} has no {_RODATA} section", advice="Declare the global const volatile"
            )
        sec = libbpf.btf__type_by_id(btf, sec_id)
        vlen = sec.info & 0xFFFF
        infos = ffi.cast("const struct btf_var_secinfo *", sec + 1)
        for i in range(vlen):
            var = libbpf.btf__type_by_id(btf, infos[i].type)
            is_var = (var.info >> 24) & 0x1F == BTF_KIND_VAR
            if is_var and string(libbpf.btf__name_by_offset(btf, var.name_off)) == name:
                return int(infos[i].offset), int(infos[i].size)
        raise errors.NotFound(f"no const volatile {name!r} in {self.name}", advice="Check the variable name")

    # -- load --------------------------------------------------------------------------------

    def load(self) -> None:
        """Create the maps and load the programs that are set to autoload.

        Raises:
            VerifierError: The verifier rejected a program; carries libbpf's log.
            BpfError: Another failure (see its subclass and errno).
        """
        with log.capture() as captured:
            result = lib().bpf_object__load(self._pointer())
        if result < 0:
            text = "".join(captured)
            what = f"bpf_object__load({self.name})"
            marker = text.rfind("libbpf: prog '", 0, max(text.rfind("BEGIN PROG LOAD LOG"), 0))
            if "BEGIN PROG LOAD LOG" in text:
                raise errors.VerifierError(what, -result, text[marker:] if marker >= 0 else text)
            exc = errors.from_errno(what, -result)
            if text:
                exc.add_note(text.rstrip("\n"))
            raise exc
        self.loaded = True
