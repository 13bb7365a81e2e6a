"""Score stage: how new is this destination for this executable?

A baseline of (executable -> destinations seen, with counts) is learned while
the agent runs and kept across restarts in the state directory. The score is
1.0 for a destination an executable with an established history has never
used, lower the more often it has been seen, and damped while the executable
itself is new (everything is new to a program seen for the first time).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec

from pipeline.events import Anomaly

BASELINE_VERSION = 1


class _Destination(msgspec.Struct):
    count: int
    first_seen: float
    last_seen: float


class _Profile(msgspec.Struct):
    first_seen: float
    observations: int = 0
    destinations: dict[str, _Destination] = {}


class _BaselineFile(msgspec.Struct):
    version: int
    profiles: dict[str, _Profile]


class Baseline:
    """Per-executable destination history with a novelty score.

    Args:
        path: where the baseline is saved (None: not persisted).
        warmup_observations: an executable with fewer observations is still being learned.
        max_destinations: per executable; the least recently seen are forgotten beyond it.
        max_profiles: executables kept.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        warmup_observations: int = 20,
        max_destinations: int = 4096,
        max_profiles: int = 4096,
    ) -> None:
        self.path = path
        self.warmup = warmup_observations
        self.max_destinations = max_destinations
        self.max_profiles = max_profiles
        self.profiles: dict[str, _Profile] = {}
        self.dirty = False
        if path is not None and path.exists():
            self.load()

    def load(self) -> None:
        """Read the saved baseline (a corrupt file is set aside, not fatal)."""
        assert self.path is not None
        try:
            data = msgspec.json.decode(self.path.read_bytes(), type=_BaselineFile)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            os.replace(self.path, self.path.with_suffix(".corrupt"))
            return
        if data.version == BASELINE_VERSION:
            self.profiles = data.profiles

    def save(self) -> None:
        """Write the baseline atomically (0600)."""
        if self.path is None or not self.dirty:
            return
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(msgspec.json.encode(_BaselineFile(BASELINE_VERSION, self.profiles)))
        os.replace(tmp, self.path)
        self.dirty = False

    def observe(self, exe: str, destination: str, now: float | None = None) -> Anomaly:
        """Score one connection, then learn it.

        Args:
            exe: executable path (or comm when unknown).
            destination: e.g. "203.0.113.5:443/tcp".
            now: wall-clock seconds (for tests).

        Returns:
            The anomaly score and the reasons behind it.
        """
        now = time.time() if now is None else now
        profile = self.profiles.get(exe)
        if profile is None:
            if len(self.profiles) >= self.max_profiles:
                del self.profiles[next(iter(self.profiles))]  # dicts keep insertion order: the oldest
            profile = self.profiles[exe] = _Profile(first_seen=now, destinations={})
        dest = profile.destinations.get(destination)
        learning = profile.observations < self.warmup
        if dest is None:
            if learning:
                score = 0.5
                reasons = [f"first time {exe} reaches {destination} (still learning this program)"]
            else:
                score = 1.0
                reasons = [
                    f"first time {exe} reaches {destination} after {profile.observations} connections "
                    f"to {len(profile.destinations)} known destinations"
                ]
            if len(profile.destinations) >= self.max_destinations:
                # Least recently seen first: every hit moves its destination to the end.
                del profile.destinations[next(iter(profile.destinations))]
            profile.destinations[destination] = _Destination(1, now, now)
        else:
            score = round(1.0 / (1 + dest.count), 4)
            reasons = [] if score < 0.5 else [f"{exe} reached {destination} only {dest.count} time(s) before"]
            dest.count += 1
            dest.last_seen = now
            del profile.destinations[destination]  # move to the end (most recently seen)
            profile.destinations[destination] = dest
        profile.observations += 1
        self.dirty = True
        return Anomaly(score=score, reasons=reasons)
