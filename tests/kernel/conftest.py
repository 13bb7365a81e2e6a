"""Fixtures for the real-kernel sensor tests: one loaded sensor object per module, in a scratch cgroup."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kernel.kernel_harness import Harness, harness_session
from tests.kernel_support import require_kernel


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """Sensors loaded in prevent mode and attached to a scratch cgroup this module owns."""
    require_kernel()
    yield from harness_session(tmp_path_factory.mktemp("policies"), mode="prevent")


@pytest.fixture
def h(harness: Harness) -> Iterator[Harness]:
    """The module's harness, reset to prevent mode with nothing pending in the ring buffer."""
    harness.sensors.set_mode("prevent")
    harness.drain()
    yield harness
    harness.sensors.set_mode("prevent")
