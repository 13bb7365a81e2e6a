"""Fixtures for the loaders tests: the kernel gate, the test object, scratch cgroups and bpffs dirs."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel_support import require_kernel

DATA = Path(__file__).parent / "data"
TEST_OBJECT = DATA / "test_progs.bpf.o"


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Gate every test marked ``kernel``."""
    if item.get_closest_marker("kernel") is not None:
        require_kernel()


@pytest.fixture
def kernel() -> None:
    """Request a BPF-capable kernel (skip, or fail under REQUIRE_BPF=1)."""
    require_kernel()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def pin_dir(kernel: None) -> Iterator[Path]:
    """A fresh directory in bpffs, removed with whatever is pinned in it."""
    from loaders import bpffs

    path = Path(bpffs.ensure_mounted()) / f"tooltest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
