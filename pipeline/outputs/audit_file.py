"""An append-only file readable by root only, rotated by size and age with retention.

The directory is created 0700 and the file 0600 with ``mkdir``/``open`` modes, which the
umask can only narrow, so there is never a moment of wider permissions; existing paths
that are too wide are tightened and reported. All file operations go through a file
descriptor of the directory, so a rename of the directory cannot redirect them, and the
log file is opened with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import structlog

_log = structlog.get_logger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW


class AuditPathError(Exception):
    """The audit log cannot be kept safely at the configured path."""


class SecureRotatingFile:
    """The audit log file: append lines, rotate ``name`` -> ``name.1`` -> ... ``name.<keep>``.

    Args:
        path: the log file; its directory belongs to the audit log and is made 0700.
        max_bytes: rotate before a write would take the file past this size.
        max_age_s: rotate when the current file was started this long ago.
        keep: number of rotated files kept (``name.1`` is the newest); 0 keeps none.
        clock: wall clock in seconds, replaceable for tests.
        notes: receives a ``(event, fields)`` pair for every notable thing the file did
            (permissions fixed, rotated), so that the owner can record it in the log itself.

    Raises:
        AuditPathError: the directory is ``/`` or a shared sticky directory such as /tmp.
        OSError: the directory or the file cannot be created or opened.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        max_age_s: float,
        keep: int,
        clock: Callable[[], float] = time.time,
        notes: Callable[[str, dict[str, object]], None] | None = None,
    ) -> None:
        if max_bytes <= 0 or max_age_s <= 0 or keep < 0:
            raise ValueError("max_bytes and max_age_s must be positive and keep not negative")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.keep = keep
        self._clock = clock
        self._notes = notes or (lambda _event, _fields: None)
        self._name = self.path.name
        self._dir_fd = self._open_dir(self.path.parent)
        self._fd = -1
        self._size = 0
        self._started = 0.0
        self._tighten_rotated()
        self._open_file()

    # -- setup -----------------------------------------------------------------------------

    def _open_dir(self, directory: Path) -> int:
        directory.parent.mkdir(parents=True, exist_ok=True)
        created = False
        try:
            os.mkdir(directory, DIR_MODE)
            created = True
        except FileExistsError:
            pass
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.fstat(dir_fd)
            if os.path.realpath(directory) == "/" or st.st_mode & stat.S_ISVTX:
                raise AuditPathError(
                    f"{directory} is not a safe place for the audit log: use a dedicated "
                    "directory such as /var/log/tool"
                )
            self._own(dir_fd, st, directory, DIR_MODE, report=not created)
        except BaseException:
            os.close(dir_fd)
            raise
        return dir_fd

    def _own(self, fd: int, st: os.stat_result, what: Path, mode: int, *, report: bool) -> None:
        """Make ``fd`` owned by us with exactly ``mode``; report when it was wider or foreign."""
        euid, egid = os.geteuid(), os.getegid()
        if st.st_uid != euid:
            os.fchown(fd, euid, egid)
            self._note("owner_fixed", path=str(what), old_uid=st.st_uid, new_uid=euid)
        old = stat.S_IMODE(st.st_mode)
        if old != mode:
            os.fchmod(fd, mode)
            if report and old & ~mode:
                self._note("permissions_fixed", path=str(what), old=f"{old:04o}", new=f"{mode:04o}")

    def _note(self, event: str, **fields: object) -> None:
        _log.warning(f"audit_{event}", **fields)
        self._notes(event, fields)

    def _rotated_names(self) -> dict[int, str]:
        names: dict[int, str] = {}
        prefix = self._name + "."
        for entry in os.listdir(self._dir_fd):
            suffix = entry[len(prefix) :] if entry.startswith(prefix) else ""
            if suffix.isdigit():
                names[int(suffix)] = entry
        return names

    def _tighten_rotated(self) -> None:
        for name in self._rotated_names().values():
            try:
                fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self._dir_fd)
            except OSError:
                continue
            try:
                self._own(fd, os.fstat(fd), self.path.parent / name, FILE_MODE, report=True)
            finally:
                os.close(fd)

    def _open_file(self) -> None:
        try:
            fd = os.open(self._name, _OPEN_FLAGS | os.O_EXCL, FILE_MODE, dir_fd=self._dir_fd)
            created = True
        except FileExistsError:
            fd = os.open(self._name, _OPEN_FLAGS, FILE_MODE, dir_fd=self._dir_fd)
            created = False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise AuditPathError(f"{self.path} is not a regular file")
            self._own(fd, st, self.path, FILE_MODE, report=not created)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._size = st.st_size
        self._started = self._clock() if st.st_size == 0 else self._first_line_time(st.st_mtime)

    def _first_line_time(self, fallback: float) -> float:
        """When the current file was started: the time prefix of its first line."""
        try:
            fd = os.open(self._name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self._dir_fd)
            try:
                head = os.read(fd, 32).decode("ascii", "replace")
            finally:
                os.close(fd)
            stamp = head.split(" ", 1)[0].replace("Z", "+00:00")
            return datetime.fromisoformat(stamp).timestamp()
        except (OSError, ValueError):
            return fallback

    # -- writing ---------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes in the current file."""
        return self._size

    def rotation_due(self, incoming: int = 0) -> str | None:
        """Why the file should be rotated before writing ``incoming`` more bytes, if it should.

        Returns:
            ``"size"``, ``"age"`` or None.
        """
        if self._size == 0:
            return None
        if self._size + incoming > self.max_bytes:
            return "size"
        if self._clock() - self._started >= self.max_age_s:
            return "age"
        return None

    def append(self, data: bytes) -> None:
        """Append whole lines (never split across files).

        Raises:
            OSError: the write failed (disk full, I/O error).
        """
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
            self._size += written

    def rotate(self, reason: str) -> str | None:
        """Close the current file, shift the rotated ones and start a new, empty file.

        Args:
            reason: why (``size``, ``age``), for the log.

        Returns:
            The name the old file now has, or None when ``keep`` is 0 and it was deleted.
        """
        os.close(self._fd)
        self._fd = -1
        previous: str | None = None
        try:
            if self.keep == 0:
                os.unlink(self._name, dir_fd=self._dir_fd)
            else:
                existing = self._rotated_names()
                for index in sorted(existing, reverse=True):
                    if index >= self.keep:
                        os.unlink(existing[index], dir_fd=self._dir_fd)
                    else:
                        os.rename(
                            existing[index],
                            f"{self._name}.{index + 1}",
                            src_dir_fd=self._dir_fd,
                            dst_dir_fd=self._dir_fd,
                        )
                previous = f"{self._name}.1"
                os.rename(self._name, previous, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        finally:
            self._open_file()
        _log.info("audit_rotated", path=str(self.path), reason=reason, previous=previous)
        return previous

    def fsync(self) -> None:
        """Force the written lines to stable storage."""
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the file and the directory (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1
