"""Stage logic that does not need the kernel: sequence gaps, scoring, identity, cgroup names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.enrich import ProcessTable, describe_cgroup
from pipeline.score import Baseline
from pipeline.stages import GapTracker, exit_code_of


def test_gap_tracker_counts_lost_records_per_cpu_and_tolerates_reordering() -> None:
    g = GapTracker(settle=8)
    for seq in (1, 2, 4, 3, 5):  # 3 arrives late: not lost
        g.see(0, seq)
    for seq in (1, 2, 6):  # 3, 4, 5 never arrive on cpu 1
        g.see(1, seq)
    assert g.lost == 0  # not yet settled
    for seq in range(7, 20):
        g.see(1, seq)
    assert g.lost == 3
    g.see(0, 7)  # hole 6 on cpu 0
    g.settle_all()
    assert g.lost == 4


def test_baseline_scores_new_destinations_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "baseline.json"
    b = Baseline(path, warmup_observations=3)
    assert b.observe("/usr/bin/curl", "1.1.1.1:443/tcp", now=1).score == 0.5  # still learning
    for _ in range(3):
        b.observe("/usr/bin/curl", "1.1.1.1:443/tcp", now=2)
    assert b.observe("/usr/bin/curl", "1.1.1.1:443/tcp", now=3).score < 0.25
    novel = b.observe("/usr/bin/curl", "6.6.6.6:4444/tcp", now=4)
    assert novel.score == 1.0 and "6.6.6.6:4444/tcp" in novel.reasons[0]
    b.save()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    again = Baseline(path, warmup_observations=3)
    assert again.observe("/usr/bin/curl", "6.6.6.6:4444/tcp", now=5).score == 0.5  # seen once before


def test_corrupt_baseline_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "baseline.json"
    path.write_text("{not json")
    b = Baseline(path)
    assert b.profiles == {} and (tmp_path / "baseline.corrupt").exists()


def test_exit_status_reads_like_a_shell() -> None:
    assert exit_code_of(7 << 8) == 7
    assert exit_code_of(9) == -9
    assert exit_code_of(0) == 0


def test_cgroup_paths_reveal_units_and_containers() -> None:
    c = describe_cgroup(5, "/system.slice/nginx.service")
    assert c.systemd_unit == "nginx.service" and c.container_id is None
    cid = "a" * 64
    k = describe_cgroup(6, f"/kubepods.slice/kubepods-pod1.slice/cri-containerd-{cid}.scope")
    assert k.container_id == cid
    d = describe_cgroup(7, f"/system.slice/docker-{cid}.scope")
    assert d.container_id == cid and d.systemd_unit == f"docker-{cid}.scope"


def test_recycled_pid_is_not_given_the_newcomers_identity() -> None:
    """An event whose exec id does not match what /proc shows for that pid gets no /proc identity."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        table = ProcessTable()
        info = table.lookup(proc.pid, 0, "python")
        assert info is not None and info.exe == os.path.realpath(sys.executable)
        stranger = ProcessTable().lookup(proc.pid, info.exec_id + 10**12, "python")  # a different process
        assert stranger is None
    finally:
        proc.kill()
        proc.wait()


def test_exec_identity_outlives_the_process() -> None:
    table = ProcessTable()
    table.on_exec(999999, 42, 1, "/usr/bin/curl", ["curl", "-s", "x"], "curl")
    table.on_exit(999999, 42)
    info = table.lookup(999999, 42, "curl")
    assert info is not None and info.exe == "/usr/bin/curl" and info.cmdline == ["curl", "-s", "x"]


def test_baseline_forgets_the_least_recently_seen_destination_first() -> None:
    b = Baseline(None, warmup_observations=0, max_destinations=3)
    for d in ("a", "b", "c"):
        b.observe("/bin/x", d, now=1)
    b.observe("/bin/x", "a", now=2)  # a is fresh again
    b.observe("/bin/x", "d", now=3)  # evicts b, the least recently seen
    assert list(b.profiles["/bin/x"].destinations) == ["c", "a", "d"]
