"""The cgroup watcher sees cgroups created after the load, nested ones included, and only matching ones."""

from __future__ import annotations

import os

import anyio
import pytest

from loaders import cgroup as cg
from pipeline.cgroup_watch import CgroupWatcher
from tests.kernel_support import require_kernel


@pytest.mark.anyio
async def test_new_matching_cgroups_are_reported_nested_and_in_bursts() -> None:
    require_kernel()
    root = cg.cgroup2_root()
    with cg.scratch_cgroup("tooltest-watch") as path:
        rel = os.path.relpath(path, root)
        seen: list[str] = []
        got = anyio.Event()

        async def on_match(created: list[str]) -> None:
            seen.extend(created)
            if any(c.endswith("cri-containerd-abc123.scope") for c in seen):
                got.set()

        watcher = CgroupWatcher(root, [f"{rel}/**/*abc123*", f"{rel}/svc-*.service"], on_match)
        made = []
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(watcher.run)
                # A pod's cgroups arrive as a burst of nested mkdirs; only some match.
                for sub in ("kubepods", "kubepods/pod1", "kubepods/pod1/cri-containerd-abc123.scope", "other"):
                    os.mkdir(os.path.join(path, sub))
                    made.append(os.path.join(path, sub))
                with anyio.fail_after(10):
                    await got.wait()
                os.mkdir(os.path.join(path, "svc-web.service"))
                made.append(os.path.join(path, "svc-web.service"))
                with anyio.fail_after(10):
                    while f"{rel}/svc-web.service" not in seen:
                        await anyio.sleep(0.02)
                tg.cancel_scope.cancel()
        finally:
            for d in reversed(made):
                os.rmdir(d)
    assert f"{rel}/kubepods/pod1/cri-containerd-abc123.scope" in seen
    assert not any(s.endswith(("kubepods", "pod1", "other")) for s in seen)


@pytest.mark.anyio
async def test_a_plain_path_made_again_is_reported() -> None:
    """systemctl restart makes a unit's cgroup again with a new id: a plain selector follows it."""
    require_kernel()
    root = cg.cgroup2_root()
    with cg.scratch_cgroup("tooltest-watch") as path:
        rel = os.path.relpath(path, root)
        unit = os.path.join(path, "web.service")
        os.mkdir(unit)
        seen: list[str] = []

        async def on_match(created: list[str]) -> None:
            seen.extend(created)

        try:
            async with anyio.create_task_group() as tg:
                await tg.start(CgroupWatcher(root, [f"{rel}/web.service"], on_match).run)
                os.rmdir(unit)
                os.mkdir(unit)
                with anyio.fail_after(10):
                    while not seen:
                        await anyio.sleep(0.02)
                tg.cancel_scope.cancel()
        finally:
            os.rmdir(unit)
    assert seen == [f"{rel}/web.service"]
