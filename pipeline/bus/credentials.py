"""Bus credentials: generated once per state directory, stored 0600 in a 0700 directory.

Two users exist on the embedded server:

* ``agent``: the agent itself; publishes events, serves the API, manages the stream.
* ``consumer``: handed to subscribers (enforcement, audit, exporters, third parties);
  may read events and call the API, may not publish events.

Each is a small JSON file ``<state_dir>/credentials/<user>.json``::

    {"user": "consumer", "password": "...", "url": "nats://127.0.0.1:4222"}

The ``url`` field is rewritten on each server start (the port may change); the password
is generated once and kept.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import urllib.parse
from pathlib import Path
from typing import Literal

import msgspec

Role = Literal["agent", "consumer"]
ROLES: tuple[Role, ...] = ("agent", "consumer")
CREDENTIALS_DIR = "credentials"

_DIR_MODE = 0o700
_FILE_MODE = 0o600


class CredentialsError(Exception):
    """A credentials file is missing, unreadable or malformed."""


class Credentials(msgspec.Struct, frozen=True):
    """One user's login to the bus.

    Attributes:
        user: NATS user name.
        password: NATS password (random, URL-safe).
        url: Server URL without credentials, e.g. ``nats://127.0.0.1:4222``; empty until
            the server has started once.
    """

    user: str
    password: str
    url: str = ""

    def url_with_auth(self) -> str:
        """Return ``nats://user:password@host:port``, usable by any NATS client.

        Raises:
            CredentialsError: The server URL is not known yet.
        """
        if not self.url:
            raise CredentialsError(f"no server URL recorded for user {self.user!r}; start the agent first")
        parts = urllib.parse.urlsplit(self.url)
        user = urllib.parse.quote(self.user, safe="")
        password = urllib.parse.quote(self.password, safe="")
        netloc = f"{user}:{password}@{parts.hostname}:{parts.port}"
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Credentials)


def credentials_dir(state_dir: Path) -> Path:
    """Return the directory that holds the credentials files."""
    return state_dir / CREDENTIALS_DIR


def credentials_path(state_dir: Path, role: Role) -> Path:
    """Return the path of one role's credentials file."""
    return credentials_dir(state_dir) / f"{role}.json"


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) so that it is 0700 from the start, and enforce 0700.

    Args:
        path: Directory to create.
    """
    old_umask = os.umask(0o077)
    try:
        path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    finally:
        os.umask(old_umask)
    os.chmod(path, _DIR_MODE)


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; the file is 0600 from its creation on.

    Args:
        path: Destination file; its directory must exist.
        data: Content.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    old_umask = os.umask(0o077)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
    finally:
        os.umask(old_umask)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def load_credentials(state_dir: Path, role: Role) -> Credentials:
    """Read one role's credentials from ``state_dir``.

    Args:
        state_dir: The agent's state directory (e.g. ``/var/lib/tool``).
        role: ``"agent"`` or ``"consumer"``.

    Returns:
        The stored credentials.

    Raises:
        CredentialsError: The file is missing, unreadable or malformed.
    """
    path = credentials_path(state_dir, role)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CredentialsError(f"{path} does not exist: start the agent once, or pass --nats URL") from None
    except PermissionError:
        raise CredentialsError(
            f"cannot read {path}: run as root, or ask the administrator for the consumer credentials"
        ) from None
    try:
        return _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise CredentialsError(f"{path} is malformed: {exc}") from None


def ensure_credentials(state_dir: Path, url: str = "") -> dict[Role, Credentials]:
    """Load the credentials of both roles, generating those that do not exist yet.

    Args:
        state_dir: The agent's state directory.
        url: If not empty, the server URL to record in each file.

    Returns:
        The credentials by role.
    """
    directory = credentials_dir(state_dir)
    make_private_dir(directory)
    result: dict[Role, Credentials] = {}
    for role in ROLES:
        path = credentials_path(state_dir, role)
        if path.exists():
            os.chmod(path, _FILE_MODE)
            creds = load_credentials(state_dir, role)
            if url and creds.url != url:
                creds = msgspec.structs.replace(creds, url=url)
                write_private_file(path, _encoder.encode(creds) + b"\n")
        else:
            creds = Credentials(user=role, password=secrets.token_urlsafe(32), url=url)
            write_private_file(path, _encoder.encode(creds) + b"\n")
        result[role] = creds
    return result
