"""Tests of the parts of the binding that need no kernel: errors, mount-table parsing."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from loaders import bpffs, cgroup, errors

MOUNTS = """\
sysfs /sys sysfs rw,nosuid 0 0
tmpfs /sys/fs/cgroup tmpfs rw 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
bpf /sys/fs/bpf bpf rw 0 0
bpf /tmp/with\\040space bpf rw 0 0
"""


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.EPERM, errors.PermissionDenied),
        (errno.EACCES, errors.PermissionDenied),
        (errno.ENOENT, errors.NotFound),
        (errno.EOPNOTSUPP, errors.NotSupported),
        (errors.ENOTSUPP, errors.NotSupported),
        (errno.E2BIG, errors.BpfError),
    ],
)
def test_errno_maps_to_the_matching_exception(code: int, kind: type[errors.BpfError]) -> None:
    exc = errors.from_errno("bpf_thing", -code)
    assert type(exc) is kind
    assert exc.errno == code
    assert f"[Errno {code}]" in str(exc)


def test_permission_denied_says_what_to_do() -> None:
    assert "CAP_BPF" in str(errors.from_errno("bpf_prog_load", errno.EPERM))


def test_verifier_error_message_ends_with_the_log_tail() -> None:
    log = "\n".join(f"line {i}" for i in range(100))
    exc = errors.VerifierError("load", errno.EACCES, log, tail_lines=3)
    assert exc.log == log
    assert str(exc).endswith("line 97\nline 98\nline 99")


def test_cgroup2_root_is_read_from_the_mount_table(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    assert cgroup.cgroup2_root(str(mounts)) == "/sys/fs/cgroup/unified"


def test_missing_cgroup2_raises_with_advice(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text("bpf /sys/fs/bpf bpf rw 0 0\n")
    with pytest.raises(errors.NoCgroup2, match="mount -t cgroup2"):
        cgroup.cgroup2_root(str(mounts))


def test_bpffs_mount_points_are_unescaped(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    assert bpffs.mounts("bpf", str(mounts)) == ["/sys/fs/bpf", "/tmp/with space"]
