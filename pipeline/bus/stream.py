"""The JetStream stream that keeps published events so a consumer that was down catches up."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Literal

import structlog
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, PersistMode, RetentionPolicy, StorageType, StreamConfig, StreamInfo
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from pipeline.bus.server import EVENTS_STREAM
from pipeline.events import SUBJECT_ROOT

log = structlog.get_logger(__name__)

DEFAULT_MAX_AGE_S = 86_400.0
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB
DEFAULT_DUPLICATE_WINDOW_S = 120.0


StorageName = Literal["file", "memory"]
PersistName = Literal["default", "async"]


class StreamConfigError(Exception):
    """nats-server will not give the events stream the configuration asked for; the message says what to do."""


class PersistModeMismatch(StreamConfigError):
    """The stream exists with the other persist mode, which JetStream cannot change on an existing stream.

    Attributes:
        stream: Stream name.
        kept: The stream's persist mode, which stays in force.
        wanted: The persist mode asked for.
    """

    def __init__(self, stream: str, kept: PersistName, wanted: PersistName) -> None:
        self.stream, self.kept, self.wanted = stream, kept, wanted
        super().__init__(
            f"stream {stream} was created with persist mode {kept!r} and JetStream cannot change that to"
            f" {wanted!r}: ask for {kept!r} again (event_stream_persist), or delete the stream"
            f" (`nats stream rm {stream}`; the events it holds are lost) and restart; until then it"
            f" stays {kept!r}"
        )


def stream_config(
    *,
    name: str = EVENTS_STREAM,
    subjects: Sequence[str] = (f"{SUBJECT_ROOT}.>",),
    max_age_s: float = DEFAULT_MAX_AGE_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
    duplicate_window_s: float = DEFAULT_DUPLICATE_WINDOW_S,
    storage: StorageName = "file",
    persist: PersistName = "default",
) -> StreamConfig:
    """Build the events stream configuration (limits retention, discard old).

    Args:
        name: Stream name.
        subjects: Subjects captured by the stream.
        max_age_s: Oldest event kept, in seconds.
        max_bytes: Largest total size kept; the oldest events go first.
        duplicate_window_s: Window in which a repeated ``Nats-Msg-Id`` is stored once.
        storage: "file" (kept across server restarts) or "memory" (faster, lost when the
            server stops).
        persist: "default" (each event is written to the file, i.e. handed to the kernel, before
            JetStream acknowledges it) or "async" (events are batched in nats-server's memory and
            acknowledged first: less server CPU, but the last ones acknowledged are lost if
            nats-server is killed; file storage and nats-server 2.12 or later only). "default"
            leaves the field out, so that servers older than 2.12 see nothing new.

    Returns:
        The configuration.

    Raises:
        ValueError: ``storage`` or ``persist`` is none of the above, or "async" is asked for
            with memory storage.
    """
    storages = {"file": StorageType.FILE, "memory": StorageType.MEMORY}
    if storage not in storages:
        raise ValueError(f"event stream storage {storage!r}: expected 'file' or 'memory'")
    if persist not in ("default", "async"):
        raise ValueError(f"event stream persist mode {persist!r}: expected 'default' or 'async'")
    if persist == "async" and storage != "file":
        raise ValueError("event stream persist mode 'async' needs file storage")
    return StreamConfig(
        name=name,
        description="tool events: every decision the agent published",
        subjects=list(subjects),
        retention=RetentionPolicy.LIMITS,
        storage=storages[storage],
        discard=DiscardPolicy.OLD,
        max_age=max_age_s,
        max_bytes=max_bytes,
        duplicate_window=duplicate_window_s,
        num_replicas=1,
        persist_mode=PersistMode.ASYNC if persist == "async" else None,
    )


def server_has_persist_modes(version: str) -> bool:
    """Whether a nats-server of this version knows stream persist modes (2.12 and later).

    An unknown or unreadable version counts as yes: the server's answer then tells.
    """
    parts = version.split("-", 1)[0].split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return True
    return major == 0 or (major, minor) >= (2, 12)


def persist_of(config: StreamConfig) -> PersistName:
    """The persist mode of a stream configuration (absent means "default")."""
    return "async" if config.persist_mode == PersistMode.ASYNC else "default"


async def ensure_stream(js: JetStreamContext, config: StreamConfig | None = None) -> StreamInfo:
    """Create the events stream, or update it to ``config`` if it exists.

    Args:
        js: JetStream context of a connection with the agent's credentials.
        config: From :func:`stream_config` (default: its defaults).

    Returns:
        The stream's info after creation or update.

    Raises:
        PersistModeMismatch: The stream exists with the other persist mode; it is left as it is.
        StreamConfigError: The server refused the configuration (e.g. a storage change); the
            message has its reason.
    """
    if config is None:
        config = stream_config()
    assert config.name is not None
    try:
        existing = await js.stream_info(config.name)
    except NotFoundError:
        info = await _applied(js.add_stream(config), config)
        log.info("stream_created", stream=config.name, subjects=config.subjects, persist=persist_of(info.config))
        return info
    kept, wanted = persist_of(existing.config), persist_of(config)
    if kept != wanted and existing.config.storage == config.storage:
        # The server would refuse the update; say what to do instead. (A storage change is
        # refused too, and the server's own reason names that one.)
        raise PersistModeMismatch(config.name, kept, wanted)
    info = await _applied(js.update_stream(config), config)
    log.info("stream_updated", stream=config.name, subjects=config.subjects, persist=persist_of(info.config))
    return info


async def _applied(request: Awaitable[StreamInfo], config: StreamConfig) -> StreamInfo:
    """Await a create or update, report a refusal as :class:`StreamConfigError`, and check what was kept."""
    try:
        info = await request
    except APIError as exc:
        if isinstance(exc, NotFoundError | ServiceUnavailableError):
            raise  # no stream or no JetStream: not a matter of configuration
        hint = ""
        if persist_of(config) == "async" and "persist_mode" in (exc.description or ""):
            hint = "; persist mode async needs nats-server 2.12 or later"  # 2.11 in strict mode
        raise StreamConfigError(
            f"nats-server refused the configuration of stream {config.name}: {exc.description}"
            f" (error {exc.err_code}){hint}"
        ) from exc
    if persist_of(config) == "async" and persist_of(info.config) != "async":
        # A server older than 2.12 ignores the field it does not know (2.11 logs it): nothing
        # is lost, every event is written before it is acknowledged, as by default.
        log.warning(
            "event_stream_persist_ignored",
            stream=config.name,
            advice="persist mode async needs nats-server 2.12 or later; the stream persists as by default",
        )
    return info
