"""The exception tree of the libbpf binding: one base class, one subclass per thing a user can fix."""

from __future__ import annotations

import errno as _errno
import os

ENOTSUPP = 524  # kernel-internal "operation not supported", leaks out of the bpf() syscall


class BpfError(Exception):
    """A BPF operation failed.

    Attributes:
        errno: The positive errno value the kernel or libbpf reported (0 when none applies).
        what: The operation that failed, e.g. ``"bpf_object__load(test_progs)"``.
        advice: What the user can do about it.
    """

    default_advice = ""

    def __init__(self, what: str, errno: int = 0, advice: str | None = None) -> None:
        self.what = what
        self.errno = errno
        self.advice = self.default_advice if advice is None else advice
        super().__init__(self._compose())

    def _compose(self) -> str:
        text = self.what
        if self.errno:
            text += f": [Errno {self.errno}] {_strerror(self.errno)}"
        if self.advice:
            text += f". {self.advice}"
        return text


class PermissionDenied(BpfError):
    """The kernel refused the operation for lack of privileges."""

    default_advice = "Run as root or grant CAP_BPF+CAP_NET_ADMIN+CAP_PERFMON"


class NotSupported(BpfError):
    """The kernel lacks the program type, map type or operation."""

    default_advice = (
        "This kernel lacks the feature; the agent needs Linux >= 5.8 (ring buffer, CAP_BPF), "
        "run `tool-pipeline doctor` to see what this host supports"
    )


class NotFound(BpfError):
    """A file, pin, program or map does not exist."""

    default_advice = "Check the path or name"


class NoBTF(BpfError):
    """The kernel exposes no BTF type information."""

    default_advice = (
        "/sys/kernel/btf/vmlinux missing: kernel built without CONFIG_DEBUG_INFO_BTF; "
        "use a distribution kernel with BTF (Linux >= 5.8)"
    )


class NoCgroup2(BpfError):
    """No cgroup v2 hierarchy is mounted."""

    default_advice = (
        "No cgroup2 mount in /proc/mounts: mount one (`mount -t cgroup2 none /sys/fs/cgroup/unified`) "
        "or boot with systemd.unified_cgroup_hierarchy=1"
    )


class KernelTooOld(BpfError):
    """The running kernel is older than the minimum needed."""

    default_advice = "Upgrade to Linux >= 5.8"


class LibbpfMissing(BpfError):
    """libbpf.so.1 cannot be loaded or is older than 1.1."""

    default_advice = "Install libbpf >= 1.1: `apt-get install libbpf1` (Debian/Ubuntu)"


class VerifierError(BpfError):
    """The verifier rejected a program; ``log`` holds the libbpf and verifier output.

    Attributes:
        log: The full captured log text.
    """

    default_advice = "The verifier rejected the program; the end of its log follows"

    def __init__(self, what: str, errno: int, log: str, tail_lines: int = 30) -> None:
        self.log = log
        self.tail = "\n".join(log.rstrip("\n").splitlines()[-tail_lines:])
        super().__init__(what, errno)

    def _compose(self) -> str:
        return f"{super()._compose()}:\n{self.tail}"


def _strerror(code: int) -> str:
    if code == ENOTSUPP:
        return "Operation not supported (ENOTSUPP)"
    return os.strerror(code)


def from_errno(what: str, code: int) -> BpfError:
    """Build the exception that best explains a failed operation.

    Args:
        what: The operation that failed.
        code: The errno value (sign ignored).

    Returns:
        An instance of the most specific subclass for ``code``.
    """
    code = abs(code)
    if code in (_errno.EPERM, _errno.EACCES):
        return PermissionDenied(what, code)
    if code in (_errno.EOPNOTSUPP, ENOTSUPP, _errno.ENOSYS):
        return NotSupported(what, code)
    if code == _errno.ENOENT:
        return NotFound(what, code)
    return BpfError(what, code)
