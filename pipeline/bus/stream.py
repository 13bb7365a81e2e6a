"""The JetStream stream that keeps published events so a consumer that was down catches up."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import structlog
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig, StreamInfo
from nats.js.errors import NotFoundError

from pipeline.bus.server import EVENTS_STREAM
from pipeline.events import SUBJECT_ROOT

log = structlog.get_logger(__name__)

DEFAULT_MAX_AGE_S = 86_400.0
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB
DEFAULT_DUPLICATE_WINDOW_S = 120.0


StorageName = Literal["file", "memory"]


def stream_config(
    *,
    name: str = EVENTS_STREAM,
    subjects: Sequence[str] = (f"{SUBJECT_ROOT}.>",),
    max_age_s: float = DEFAULT_MAX_AGE_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
    duplicate_window_s: float = DEFAULT_DUPLICATE_WINDOW_S,
    storage: StorageName = "file",
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

    Returns:
        The configuration.

    Raises:
        ValueError: ``storage`` is neither.
    """
    storages = {"file": StorageType.FILE, "memory": StorageType.MEMORY}
    if storage not in storages:
        raise ValueError(f"event stream storage {storage!r}: expected 'file' or 'memory'")
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
    )


async def ensure_stream(js: JetStreamContext, config: StreamConfig | None = None) -> StreamInfo:
    """Create the events stream, or update it to ``config`` if it exists.

    Args:
        js: JetStream context of a connection with the agent's credentials.
        config: From :func:`stream_config` (default: its defaults).

    Returns:
        The stream's info after creation or update.
    """
    if config is None:
        config = stream_config()
    assert config.name is not None
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        info = await js.add_stream(config)
        log.info("stream_created", stream=config.name, subjects=config.subjects)
        return info
    info = await js.update_stream(config)
    log.info("stream_updated", stream=config.name, subjects=config.subjects)
    return info
