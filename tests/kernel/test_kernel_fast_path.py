"""The fast path's newer helpers: used where the kernel allows them, and decisions hold without them."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from loaders import abi
from loaders import sensors as sensors_module
from tests.kernel.kernel_harness import Harness, harness_session

pytestmark = pytest.mark.kernel

PORT = 40033
CONNECT = ("connect", socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", PORT, 5)
ALLOW = [{"name": "allow", "action": "allow", "direction": "egress", "to": ["127.0.0.1"], "ports": [PORT],
          "protocol": "udp"}]  # fmt: skip
DENY = [{**ALLOW[0], "name": "deny", "action": "deny"}]


def kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release.split("-")[0].split(".")
    return (int(release[0]), int(release[1])) >= (major, minor)


@pytest.fixture
def slow_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    """Sensors loaded as on a kernel older than 5.11: the task map and the boot clock, no newer helper."""
    knobs_off = dict.fromkeys(sensors_module._FAST_PATH_KNOBS, False)
    monkeypatch.setattr(sensors_module, "_fast_path_knobs", lambda: knobs_off)
    yield from harness_session(tmp_path, mode="prevent")


def test_this_kernel_lets_every_fast_path_program_use_the_newer_helpers() -> None:
    """On 5.11 and later both knobs are on, so the measured fast path is the one that runs."""
    if not kernel_at_least(5, 11):
        pytest.skip("bpf_get_current_task_btf and bpf_ktime_get_coarse_ns arrived in 5.11")
    assert sensors_module._fast_path_knobs() == {"have_task_btf": True, "have_coarse_clock": True}


def test_without_the_newer_helpers_decisions_fold_and_follow_a_policy_swap(slow_path: Harness) -> None:
    """The fallback (task map exec_id, boot clock) decides, folds and reports exactly as the fast path."""
    h = slow_path
    allow, gen_a = h.apply(ALLOW)
    before = h.sensors.counters()
    child = h.run([CONNECT] * 3)
    assert child.results == ["ok"] * 3
    assert h.sensors.counters()["folded"] - before["folded"] == 2
    (r,) = h.conns(child.pid, abi.EV_CONNECT)
    assert (r.verdict, r.rule_id, r.policy_gen, r.repeat) == (abi.VERDICT_ALLOW, allow.rule_id("allow"), gen_a, 0)
    assert r.task.exec_id != 0  # from the task map, as the flow key's process on this path

    deny, gen_b = h.apply(DENY)
    child = h.run([CONNECT] * 2)
    assert child.results == ["EPERM"] * 2
    (r,) = h.conns(child.pid, abi.EV_CONNECT)
    assert (r.verdict, r.rule_id, r.policy_gen) == (abi.VERDICT_BLOCK, deny.rule_id("deny"), gen_b)
