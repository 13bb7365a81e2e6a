"""The audit log: format, permissions, rotation, retention and gap accounting (no NATS)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from outputs_testkit import T0, audit_lines, connection, loss, policy

from pipeline.events import Cgroup, Process, ProcessEvent
from pipeline.outputs.audit import AuditWriter
from pipeline.outputs.audit_file import AuditPathError


def mode(path: Path) -> int:
    """Permission bits of a path."""
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """The most permissive umask, so that only the code's own modes protect the files."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


class TestFormat:
    def test_connection_line_has_fixed_prefix_and_documented_fields(self, tmp_path: Path) -> None:
        path = tmp_path / "audit" / "audit.log"
        with AuditWriter(path) as writer:
            writer.write(connection(1, verdict="blocked", known=False))
        conn = [line for line in audit_lines(path) if " CONN " in line]
        assert conn == [
            "2024-05-01T12:00:00.123Z CONN verdict=blocked direction=egress comm=curl pid=4242"
            " exe=/usr/bin/curl user=alice uid=1000 flow=10.0.0.5:51234->93.184.216.34:443/tcp"
            " remote_name=example.com rule=unknown/default rule_id=0 mode=prevent known=false"
            ' kind=connect ppid=1 args="curl -s https://example.com/" cgroup=/user.slice/user-1000.slice'
            " container=c0ffee host=web1 cpu=0 seq=1 id=ev-0-1"
        ]

    def test_known_rule_is_named(self, tmp_path: Path) -> None:
        path = tmp_path / "audit" / "audit.log"
        with AuditWriter(path) as writer:
            writer.write(connection(1))
        (conn,) = [line for line in audit_lines(path) if " CONN " in line]
        assert " rule=allow-https rule_id=7 policy=/etc/tool/policy.yaml mode=prevent " in conn

    def test_hostile_process_name_cannot_forge_a_line(self, tmp_path: Path) -> None:
        """A newline or a fake field in a comm is escaped inside one quoted value."""
        path = tmp_path / "audit" / "audit.log"
        with AuditWriter(path) as writer:
            writer.write(connection(1, comm="x\n2024-01-01T00:00:00.000Z CONN verdict=allowed"))
        conn = [line for line in audit_lines(path) if "CONN" in line]
        assert len(conn) == 1
        assert 'comm="x\\n2024-01-01T00:00:00.000Z CONN verdict=allowed"' in conn[0]

    def test_loss_and_policy_lines(self, tmp_path: Path) -> None:
        path = tmp_path / "audit" / "audit.log"
        with AuditWriter(path) as writer:
            writer.write(loss(delta=5, total=9))
            writer.write(policy("rejected", 4))
        lines = audit_lines(path)
        assert any(
            line.startswith("2024-05-01T12:00:00.123Z LOSS lost=5 lost_total=9 reason=ring_buffer_full")
            for line in lines
        )
        (rejected,) = [line for line in lines if " POLICY " in line]
        assert "outcome=rejected generation=4 rules=12 sources=/etc/tool/policy.yaml" in rejected
        assert "errors=\"line 3: unknown key 'prot'\"" in rejected

    def test_process_events_are_off_by_default(self, tmp_path: Path) -> None:
        exec_event = ProcessEvent(
            id="p1",
            time_ns=T0,
            host="web1",
            kind="exec",
            process=Process(pid=9, comm="sh"),
            cgroup=Cgroup(id=1),
        )
        off, on = tmp_path / "off" / "audit.log", tmp_path / "on" / "audit.log"
        with AuditWriter(off) as writer:
            writer.write(exec_event)
        with AuditWriter(on, process_events=True) as writer:
            writer.write(exec_event)
        assert not any(" EXEC " in line for line in audit_lines(off))
        assert any(" EXEC comm=sh pid=9 " in line for line in audit_lines(on))


class TestPermissions:
    def test_created_root_only_even_with_umask_zero(self, tmp_path: Path, umask_zero: None) -> None:
        directory = tmp_path / "var" / "audit"
        writer = AuditWriter(directory / "audit.log")
        try:
            assert mode(directory) == 0o700
            assert mode(directory / "audit.log") == 0o600
        finally:
            writer.close()

    def test_too_wide_existing_paths_are_tightened_and_logged(self, tmp_path: Path, umask_zero: None) -> None:
        directory = tmp_path / "audit"
        directory.mkdir(mode=0o755)
        (directory / "audit.log").write_text("")
        os.chmod(directory / "audit.log", 0o644)
        (directory / "audit.log.1").write_text("old\n")
        os.chmod(directory / "audit.log.1", 0o666)
        with AuditWriter(directory / "audit.log"):
            assert mode(directory) == 0o700
            assert mode(directory / "audit.log") == 0o600
            assert mode(directory / "audit.log.1") == 0o600
        lines = audit_lines(directory / "audit.log")
        fixed = [line for line in lines if "event=permissions_fixed" in line]
        assert len(fixed) == 3
        assert any(f"path={directory} old=0755 new=0700" in line for line in fixed)
        assert any("audit.log old=0644 new=0600" in line for line in fixed)

    def test_shared_sticky_directory_is_refused(self, tmp_path: Path) -> None:
        shared = tmp_path / "shared"
        shared.mkdir()
        os.chmod(shared, 0o1777)
        with pytest.raises(AuditPathError, match="dedicated directory"):
            AuditWriter(shared / "audit.log")

    def test_symlinked_log_file_is_refused(self, tmp_path: Path) -> None:
        directory = tmp_path / "audit"
        directory.mkdir(mode=0o700)
        (directory / "audit.log").symlink_to(tmp_path / "elsewhere")
        with pytest.raises(OSError):
            AuditWriter(directory / "audit.log")


class TestRotation:
    def test_by_size_with_retention(self, tmp_path: Path, umask_zero: None) -> None:
        directory = tmp_path / "audit"
        keep = 3
        with AuditWriter(directory / "audit.log", max_bytes=1000, keep=keep) as writer:
            for seq in range(1, 40):
                writer.write(connection(seq))
        names = sorted(p.name for p in directory.iterdir())
        assert names == ["audit.log", "audit.log.1", "audit.log.2", "audit.log.3"]
        for name in names:
            assert mode(directory / name) == 0o600
            assert os.path.getsize(directory / name) <= 1000
        # the newest rotated file continues where the oldest kept one left off
        seqs = [
            int(line.split(" seq=")[1].split()[0])
            for name in ("audit.log.3", "audit.log.2", "audit.log.1", "audit.log")
            for line in audit_lines(directory / name)
            if " CONN " in line
        ]
        assert seqs == list(range(seqs[0], 40))
        assert any(
            "event=rotated reason=size previous=audit.log.1" in line for line in audit_lines(directory / "audit.log")
        )

    def test_by_age(self, tmp_path: Path) -> None:
        now = [1_714_564_800.0]
        directory = tmp_path / "audit"
        with AuditWriter(directory / "audit.log", max_age_s=3600, clock=lambda: now[0]) as writer:
            writer.write(connection(1))
            now[0] += 3599
            writer.maybe_rotate()
            assert not (directory / "audit.log.1").exists()
            now[0] += 1
            writer.maybe_rotate()
            assert (directory / "audit.log.1").exists()
            assert mode(directory / "audit.log.1") == 0o600
            writer.write(connection(2))
        assert any(" seq=1 " in line for line in audit_lines(directory / "audit.log.1"))
        current = audit_lines(directory / "audit.log")
        assert any("event=rotated reason=age" in line for line in current)
        assert any(" seq=2 " in line for line in current)

    def test_age_survives_restart(self, tmp_path: Path) -> None:
        """The age of an existing file is taken from its first line, not from the restart."""
        now = [1_714_564_800.0]
        path = tmp_path / "audit" / "audit.log"
        with AuditWriter(path, max_age_s=3600, clock=lambda: now[0]):
            pass
        now[0] += 4000
        with AuditWriter(path, max_age_s=3600, clock=lambda: now[0]):
            pass
        assert (path.parent / "audit.log.1").exists()


class TestGaps:
    def test_gap_line_counts_missing_events_per_cpu(self, tmp_path: Path) -> None:
        path = tmp_path / "audit" / "audit.log"
        with AuditWriter(path) as writer:
            for seq, cpu in [(1, 0), (1, 1), (2, 0), (2, 1), (3, 1), (15, 0), (4, 1)]:
                writer.write(connection(seq, cpu=cpu))
            assert writer.gaps_missing == 12
        lines = audit_lines(path)
        gaps = [line for line in lines if " GAP " in line]
        assert gaps == ["2024-05-01T12:00:00.123Z GAP missing=12 host=web1 cpu=0 seq=3..14 reason=not-published"]
        # the gap line comes right before the event that revealed it
        assert " seq=15 " in lines[lines.index(gaps[0]) + 1]

    def test_hosts_are_tracked_separately(self, tmp_path: Path) -> None:
        path = tmp_path / "audit" / "audit.log"
        with AuditWriter(path) as writer:
            writer.write(connection(10, host="a"))
            writer.write(connection(500, host="b"))
            writer.write(connection(11, host="a"))
        assert not any(" GAP " in line for line in audit_lines(path))

    def test_sequence_going_back_is_a_reset_not_a_gap(self, tmp_path: Path) -> None:
        path = tmp_path / "audit" / "audit.log"
        with AuditWriter(path) as writer:
            writer.write(connection(100))
            writer.write(connection(1))
            writer.write(connection(2))
        lines = audit_lines(path)
        assert any("SEQRESET host=web1 cpu=0 previous=100 seq=1" in line for line in lines)
        assert not any(" GAP " in line for line in lines)


def test_a_held_burst_is_written_in_order_at_release_and_never_overfills_a_file(tmp_path: Path) -> None:
    """Held lines wait for release() (one write), keep their order, and respect max_bytes."""
    import msgspec

    path = tmp_path / "log" / "audit.log"
    with AuditWriter(path, max_bytes=4000, keep=50) as writer:
        writer.hold()
        for seq in range(1, 61):
            writer.write_connection(msgspec.json.encode(connection(seq)))
        current = [ln for ln in audit_lines(path) if " CONN " in ln]
        writer.release()
        # Oldest first: audit.log.N ... audit.log.1, then audit.log.
        files = sorted(path.parent.glob("audit.log*"), key=lambda p: -int(p.suffix[1:]) if p.suffix != ".log" else 0)
        sizes = [p.stat().st_size for p in files]
        lines = [ln for p in files for ln in audit_lines(p) if " CONN " in ln]
    # Only the lines that had to go out before a rotation were written before release().
    assert len(current) < 60
    assert [int(ln.split(" seq=")[1].split()[0]) for ln in lines] == list(range(1, 61))
    assert len(files) > 3 and max(sizes) <= 4000


@pytest.mark.parametrize("fsync", [False, True])
def test_fsync_writes_each_line_at_once(tmp_path: Path, fsync: bool) -> None:
    """With fsync on, nothing is held: every line is on disk when write returns; without, it waits."""
    path = tmp_path / "log" / "audit.log"
    with AuditWriter(path, fsync=fsync) as writer:
        writer.hold()
        writer.write(connection(1))
        assert any(" seq=1 " in ln for ln in audit_lines(path)) == fsync
        writer.release()
        assert any(" seq=1 " in ln for ln in audit_lines(path))
