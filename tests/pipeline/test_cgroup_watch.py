"""The cgroup watcher sees cgroups created after the load, nested ones included, and only matching ones."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable

import anyio
import pytest

from loaders import cgroup as cg
from pipeline.cgroup_watch import CgroupWatcher
from tests.kernel_support import require_kernel


class _Tree:
    """A scratch cgroup under watch: make and remove cgroups below it, see what was reported."""

    def __init__(self, path: str, rel: str) -> None:
        self.path, self.rel = path, rel
        self.seen: list[str] = []
        self.made: list[str] = []

    def mkdir(self, sub: str) -> None:
        os.mkdir(os.path.join(self.path, sub))
        self.made.append(os.path.join(self.path, sub))

    def rmdir(self, sub: str) -> None:
        os.rmdir(os.path.join(self.path, sub))
        self.made.remove(os.path.join(self.path, sub))

    async def until(self, condition: Callable[[], bool]) -> None:
        with anyio.fail_after(10):
            while not condition():
                await anyio.sleep(0.02)


@contextlib.asynccontextmanager
async def _watching(patterns: Callable[[str], list[str]], before: tuple[str, ...] = ()) -> AsyncIterator[_Tree]:
    """Watch a scratch cgroup for ``patterns(path from the root)``, ``before`` made first."""
    require_kernel()
    root = cg.cgroup2_root()
    with cg.scratch_cgroup("tooltest-watch") as path:
        tree = _Tree(path, os.path.relpath(path, root))

        async def on_match(created: list[str]) -> None:
            tree.seen.extend(created)

        try:
            for sub in before:
                tree.mkdir(sub)
            async with anyio.create_task_group() as tg:
                await tg.start(CgroupWatcher(root, patterns(tree.rel), on_match).run)
                yield tree
                tg.cancel_scope.cancel()
        finally:
            for d in reversed(tree.made):
                os.rmdir(d)


@pytest.mark.anyio
async def test_new_matching_cgroups_are_reported_nested_and_in_bursts() -> None:
    async with _watching(lambda rel: [f"{rel}/**/*abc123*", f"{rel}/svc-*.service"]) as tree:
        rel, seen = tree.rel, tree.seen
        # A pod's cgroups arrive as a burst of nested mkdirs; only some match.
        for sub in ("kubepods", "kubepods/pod1", "kubepods/pod1/cri-containerd-abc123.scope", "other"):
            tree.mkdir(sub)
        await tree.until(lambda: any(c.endswith("cri-containerd-abc123.scope") for c in seen))
        tree.mkdir("svc-web.service")
        await tree.until(lambda: f"{rel}/svc-web.service" in seen)
    assert f"{rel}/kubepods/pod1/cri-containerd-abc123.scope" in seen
    assert not any(s.endswith(("kubepods", "pod1", "other")) for s in seen)


@pytest.mark.anyio
async def test_a_plain_path_made_again_is_reported() -> None:
    """systemctl restart makes a unit's cgroup again with a new id: a plain selector follows it."""
    async with _watching(lambda rel: [f"{rel}/web.service"], before=("web.service",)) as tree:
        rel, seen = tree.rel, tree.seen
        tree.rmdir("web.service")
        tree.mkdir("web.service")
        await tree.until(lambda: bool(seen))
    assert seen == [f"{rel}/web.service"]
