"""Links: the kernel objects that keep a program attached; pin them to outlive the process."""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any

from loaders import errors
from loaders._ffi import call, ffi, lib, string


class Link:
    """An attachment of a program (``struct bpf_link``).

    Closing the link detaches the program unless the link is pinned in bpffs.
    """

    def __init__(self, ptr: Any, owner: object = None) -> None:
        """Wrap a ``struct bpf_link *`` (use ``Program.attach*`` or :meth:`open_pinned`)."""
        self._ptr: Any = ffi.gc(ptr, lib().bpf_link__destroy)
        self._owner = owner  # the program (and so the object) it came from

    @classmethod
    def open_pinned(cls, path: str | os.PathLike[str]) -> Link:
        """Open a link pinned at ``path``.

        Raises:
            NotFound: Nothing is pinned there.
        """
        path = os.fspath(path)
        return cls(call(f"bpf_link__open({path})", lib().bpf_link__open, path.encode()))

    def __enter__(self) -> Link:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Link(fd={self.fd if self._ptr is not None else None}, pin_path={self.pin_path!r})"

    def _pointer(self) -> Any:
        if self._ptr is None:
            raise errors.BpfError("link is closed", advice="Attach again or open the pinned link")
        return self._ptr

    @property
    def fd(self) -> int:
        """The link's file descriptor (owned by this object)."""
        return int(call("bpf_link__fd", lib().bpf_link__fd, self._pointer()))

    @property
    def pin_path(self) -> str | None:
        """Where the link is pinned, if it is."""
        if self._ptr is None:
            return None
        return string(lib().bpf_link__pin_path(self._ptr)) or None

    def pin(self, path: str | os.PathLike[str]) -> None:
        """Pin the link at ``path`` in bpffs so it outlives this process.

        Raises:
            NotFound: The directory does not exist (mount bpffs; create the directory).
        """
        path = os.fspath(path)
        call(f"bpf_link__pin({path})", lib().bpf_link__pin, self._pointer(), path.encode())

    def unpin(self) -> None:
        """Remove the pin (the link stays attached while this object holds it)."""
        call("bpf_link__unpin", lib().bpf_link__unpin, self._pointer())

    def detach(self) -> None:
        """Detach the program now, even when the link is pinned or shared."""
        call("bpf_link__detach", lib().bpf_link__detach, self._pointer())

    def close(self) -> None:
        """Release the link (idempotent): detaches the program unless pinned elsewhere."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            ffi.release(ptr)
