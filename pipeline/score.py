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
from collections import OrderedDict
from pathlib import Path
from typing import cast

import msgspec

from pipeline.events import Anomaly

BASELINE_VERSION = 1
_SCORE_ZERO_FROM = 20000  # round(1 / (1 + count), 4) == 0.0 for every count from here on


class _Destination(msgspec.Struct):
    count: int
    first_seen: float
    last_seen: float


class _Profile(msgspec.Struct):
    first_seen: float
    observations: int = 0
    # An OrderedDict in memory (see _lru); a plain JSON object in the file.
    destinations: dict[str, _Destination] = {}


def _lru(profile: _Profile) -> OrderedDict[str, _Destination]:
    """A profile's destinations, least recently seen first.

    Forgetting the oldest entry of a plain dict (``del d[next(iter(d))]``) gets slower with
    every deletion (iteration skips the deleted slots until the dict is resized), which cost
    about a tenth of the pipeline's time under a storm of new destinations; an OrderedDict
    does it, and the move to the end on every hit, in constant time.
    """
    return cast("OrderedDict[str, _Destination]", profile.destinations)


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
        self._quiet: dict[int, Anomaly] = {}  # count seen before -> its (frozen, shared) Anomaly
        self._quiet_json: dict[int, bytes] = {}  # the same, encoded
        self._encode = msgspec.json.Encoder().encode
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
            for profile in data.profiles.values():
                # The file keeps first-seen order (msgspec writes an OrderedDict in its
                # insertion order); last_seen restores least recently seen first.
                profile.destinations = OrderedDict(
                    sorted(profile.destinations.items(), key=lambda item: item[1].last_seen)
                )
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

    def observe_json(self, exe: str, destination: str, now: float) -> bytes:
        """:meth:`observe`, returning the anomaly as JSON: the pipeline's per-event path.

        Most connections go to a destination their program has used many times; for those
        this does the same bookkeeping as :meth:`observe` with fewer steps and returns the
        shared, already-encoded low score (bytes, which the hot path formats faster than a
        ``msgspec.Raw``). Everything else goes through :meth:`observe`.
        """
        profile = self.profiles.get(exe)
        if profile is not None:
            destinations = profile.destinations
            dest = destinations.get(destination)
            if dest is not None:
                count = dest.count
                if count > 1:
                    raw = self._quiet_json.get(count if count < _SCORE_ZERO_FROM else _SCORE_ZERO_FROM)
                    if raw is not None:
                        dest.count = count + 1
                        dest.last_seen = now
                        destinations.move_to_end(destination)  # type: ignore[attr-defined]
                        profile.observations += 1
                        self.dirty = True
                        return raw
        return self._encode(self.observe(exe, destination, now))

    def observe(self, exe: str, destination: str, now: float | None = None) -> Anomaly:
        """Score one connection, then learn it.

        Args:
            exe: executable path (or comm when unknown).
            destination: e.g. "203.0.113.5:443/tcp".
            now: wall-clock seconds (for tests).

        Returns:
            The anomaly score and the reasons behind it.
        """
        if now is None:
            now = time.time()
        profile = self.profiles.get(exe)
        if profile is None:
            if len(self.profiles) >= self.max_profiles:
                del self.profiles[next(iter(self.profiles))]  # dicts keep insertion order: the oldest
            profile = self.profiles[exe] = _Profile(first_seen=now, destinations=OrderedDict())
        destinations = _lru(profile)
        dest = destinations.get(destination)
        if dest is None:
            if profile.observations < self.warmup:  # still learning this program
                score = 0.5
                reasons = [f"first time {exe} reaches {destination} (still learning this program)"]
            else:
                score = 1.0
                reasons = [
                    f"first time {exe} reaches {destination} after {profile.observations} connections "
                    f"to {len(destinations)} known destinations"
                ]
            if len(destinations) >= self.max_destinations:
                # Least recently seen first: every hit moves its destination to the end.
                destinations.popitem(last=False)
            destinations[destination] = _Destination(1, now, now)
        else:
            count = dest.count
            dest.count = count + 1
            dest.last_seen = now
            destinations.move_to_end(destination)  # most recently seen
            profile.observations += 1
            self.dirty = True
            if count > 1:  # score below 0.5, no reasons: the same Anomaly serves every such event
                key = count if count < _SCORE_ZERO_FROM else _SCORE_ZERO_FROM  # bounded: all further round to 0
                quiet = self._quiet.get(key)
                if quiet is None:
                    quiet = self._quiet[key] = Anomaly(score=round(1.0 / (1 + key), 4), reasons=[])
                    self._quiet_json[key] = self._encode(quiet)
                return quiet
            return Anomaly(
                score=round(1.0 / (1 + count), 4),
                reasons=[f"{exe} reached {destination} only {count} time(s) before"],
            )
        profile.observations += 1
        self.dirty = True
        return Anomaly(score=score, reasons=reasons)
