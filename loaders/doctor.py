"""`tool-pipeline doctor`: checks that this host can run the agent, and says what to fix."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TextIO

from loaders import bpffs, cgroup, errors, native
from loaders._ffi import ffi, lib, string
from loaders.object import BpfObject

OK, WARN, FAIL, INFO = "OK", "WARN", "FAIL", "INFO"
PROBES_OBJECT = "probes.bpf.o"
MIN_KERNEL = (5, 8)

# (program in probes.bpf.c, what it is for, whether prevent mode depends on it)
PROGRAM_PROBES: tuple[tuple[str, str, bool], ...] = (
    ("probe_connect4", "cgroup/connect4 (IPv4 connect)", True),
    ("probe_connect6", "cgroup/connect6 (IPv6 connect)", True),
    ("probe_sendmsg4", "cgroup/sendmsg4 (IPv4 UDP send)", True),
    ("probe_sendmsg6", "cgroup/sendmsg6 (IPv6 UDP send)", True),
    ("probe_post_bind4", "cgroup/post_bind4 (IPv4 listeners)", False),
    ("probe_post_bind6", "cgroup/post_bind6 (IPv6 listeners)", False),
    ("probe_sock_create", "cgroup/sock_create (raw sockets)", False),
    ("probe_skb_ingress", "cgroup_skb/ingress (inbound)", False),
    ("probe_sockops", "sockops (accepted connections)", False),
    ("probe_tp_btf_exec", "tp_btf/sched_process_exec (exec events)", False),
    ("probe_tp_sys_enter_socket", "tp/syscalls/sys_enter_socket", False),
)
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_RINGBUF = 27
CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}
FEATURES_BY_VERSION = (
    ((5, 5), "tp_btf"),
    ((5, 7), "cgroup bpf_link"),
    ((5, 8), "ring buffer, CAP_BPF/CAP_PERFMON"),
)


@dataclasses.dataclass(frozen=True)
class Check:
    """One line of the doctor's report."""

    name: str
    status: str
    detail: str
    advice: str = ""
    required: bool = True  # a FAIL here means prevent mode cannot work


def _kernel_version(release: str) -> tuple[int, int]:
    parts = release.split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def check_kernel() -> Check:
    """The running kernel is new enough (ring buffer: 5.8)."""
    release = os.uname().release
    version = _kernel_version(release)
    present = [name for need, name in FEATURES_BY_VERSION if version >= need]
    if version < MIN_KERNEL:
        return Check(
            "kernel",
            FAIL,
            f"{release}; has: {', '.join(present) or 'none'}",
            errors.KernelTooOld.default_advice,
        )
    return Check("kernel", OK, f"{release} (>= 5.8: {', '.join(present)})")


def check_btf() -> Check:
    """Kernel BTF is available (CO-RE, tp_btf)."""
    path = "/sys/kernel/btf/vmlinux"
    if os.path.exists(path):
        return Check("btf", OK, path)
    return Check("btf", FAIL, f"{path} missing", errors.NoBTF.default_advice)


def check_cgroup2() -> Check:
    """A cgroup v2 hierarchy is mounted."""
    try:
        return Check("cgroup2", OK, f"mounted at {cgroup.cgroup2_root()}")
    except errors.NoCgroup2 as exc:
        return Check("cgroup2", FAIL, "not mounted", exc.advice)


def _ensure_fs(name: str, fstype: str, path: str, ensure: Callable[[str], str], required: bool) -> Check:
    if bpffs.is_mounted(path, fstype):
        return Check(name, OK, f"mounted at {path}", required=required)
    try:
        ensure(path)
    except errors.BpfError as exc:
        return Check(
            name,
            FAIL if required else WARN,
            f"not mounted at {path}: {exc.what}",
            exc.advice,
            required=required,
        )
    return Check(name, OK, f"was not mounted: mounted it at {path}", required=required)


def check_bpffs() -> Check:
    """bpffs is mounted (mounting it when absent)."""
    return _ensure_fs("bpffs", "bpf", bpffs.DEFAULT_BPFFS, bpffs.ensure_mounted, required=False)


def check_tracefs() -> Check:
    """tracefs is mounted (mounting it when absent)."""
    return _ensure_fs("tracefs", "tracefs", bpffs.DEFAULT_TRACEFS, bpffs.ensure_tracefs, required=False)


def check_capabilities(status_file: str = "/proc/self/status") -> Check:
    """The process has the capabilities BPF needs."""
    effective = 0
    with open(status_file) as f:
        for line in f:
            if line.startswith("CapEff:"):
                effective = int(line.split()[1], 16)
    have = [name for name, bit in CAPS.items() if effective >> bit & 1]
    missing = [name for name in CAPS if name not in have]
    enough = "CAP_SYS_ADMIN" in have or {"CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"} <= set(have)
    if enough:
        return Check("capabilities", OK, f"uid {os.geteuid()}; have {', '.join(have)}")
    return Check(
        "capabilities",
        FAIL,
        f"uid {os.geteuid()}; missing {', '.join(missing)}",
        errors.PermissionDenied.default_advice,
    )


def check_libbpf() -> Check:
    """libbpf.so.1 >= 1.1 can be loaded."""
    try:
        return Check("libbpf", OK, string(lib().libbpf_version_string()))
    except errors.LibbpfMissing as exc:
        return Check("libbpf", FAIL, exc.what, exc.advice)


def check_map_type(name: str, map_type: int) -> Check:
    """The kernel can create a map of ``map_type``."""
    label = f"map {name}"
    try:
        supported = lib().libbpf_probe_bpf_map_type(map_type, ffi.NULL)
    except errors.BpfError as exc:
        return Check(label, FAIL, exc.what, exc.advice)
    if supported == 1:
        return Check(label, OK, "created")
    if supported == 0:
        return Check(label, FAIL, "not supported by this kernel", errors.NotSupported.default_advice)
    return Check(
        label,
        FAIL,
        f"probe failed: [Errno {-supported}] {os.strerror(-supported)}",
        errors.PermissionDenied.default_advice if -supported in (1, 13) else "",
    )


def probes_path(objects_dir: Path | None = None) -> Path:
    """Where the committed probe object is."""
    if objects_dir is not None:
        return objects_dir / PROBES_OBJECT
    return Path(str(resources.files("loaders").joinpath("objects", PROBES_OBJECT)))


def check_program(program: str, label: str, required: bool, objects_dir: Path | None = None) -> Check:
    """Load one probe program on its own (so one failure does not hide the others)."""
    try:
        with BpfObject.open(probes_path(objects_dir)) as obj:
            for prog in obj.programs():
                prog.set_autoload(prog.name == program)
            obj.load()
    except errors.VerifierError as exc:
        return Check(
            label,
            FAIL if required else WARN,
            f"rejected: {exc.tail.splitlines()[-1:]}",
            errors.NotSupported.default_advice,
            required,
        )
    except errors.BpfError as exc:
        return Check(label, FAIL if required else WARN, str(exc).split(". ")[0], exc.advice, required)
    return Check(label, OK, "loaded", required=required)


def check_sensors() -> list[Check]:
    """Load the agent's real sensors object (nothing attached) and name every program the kernel refuses."""
    from loaders.sensors import CGROUP_PROGRAMS, OBJECT_PATH, TRACE_PROGRAMS, _rejected_program

    refused: list[Check] = []
    skip: set[str] = set()
    for _ in range(len(CGROUP_PROGRAMS) + len(TRACE_PROGRAMS)):
        try:
            with BpfObject.open(OBJECT_PATH) as obj:
                for name in skip:
                    obj.program(name).set_autoload(False)
                obj.load()
        except errors.VerifierError as exc:
            rejected = _rejected_program(exc.log)
            if rejected is None or rejected in skip:
                return [*refused, Check("sensors object", FAIL, str(exc).splitlines()[0], exc.advice)]
            skip.add(rejected)
            name = rejected
            what = CGROUP_PROGRAMS.get(name) or TRACE_PROGRAMS.get(name, name)
            required = name in ("tool_connect4", "tool_connect6", "tool_sendmsg4", "tool_sendmsg6")
            refused.append(
                Check(
                    f"sensor {name}",
                    FAIL if required else WARN,
                    f"refused by this kernel: {what} not seen",
                    "a newer kernel (see docs/architecture.md, minimum kernels)",
                    required,
                )
            )
            continue
        except errors.BpfError as exc:
            return [*refused, Check("sensors object", FAIL, exc.what, exc.advice)]
        break
    total = len(CGROUP_PROGRAMS) + len(TRACE_PROGRAMS)
    return [*refused, Check("sensors object", OK, f"{total - len(skip)} of {total} programs load")]


def check_native() -> Check:
    """The native helper for policy swaps: optional, the Python fallback does the same work slower."""
    path = native.library_path()
    try:
        helper = native.get()
    except ValueError as exc:
        return Check("native helper", WARN, str(exc), "unset TOOL_NATIVE, or set it to 0 or 1", required=False)
    if helper is not None:
        return Check("native helper", OK, f"loaded {path}", required=False)
    if os.environ.get("TOOL_NATIVE") == "0":
        return Check("native helper", INFO, "turned off by TOOL_NATIVE=0", required=False)
    if platform.machine() not in native.BUILT_FOR:
        return Check(
            "native helper",
            INFO,
            f"none is built for {platform.machine()}: policy swaps run in Python (the same result, slower)",
            required=False,
        )
    return Check(
        "native helper",
        WARN,
        f"{path} is missing or cannot be loaded: policy swaps run in Python (the same result, slower)",
        "reinstall the package; from a source checkout, `make -C loaders/csrc` (needs clang-19) rebuilds it",
        required=False,
    )


def run_checks(objects_dir: Path | None = None) -> list[Check]:
    """Run every check, in report order."""
    checks = [
        check_kernel(),
        check_btf(),
        check_cgroup2(),
        check_bpffs(),
        check_tracefs(),
        check_capabilities(),
        check_libbpf(),
    ]
    if checks[-1].status == OK:
        checks.append(check_map_type("ringbuf", BPF_MAP_TYPE_RINGBUF))
        lpm = check_map_type("lpm_trie", BPF_MAP_TYPE_LPM_TRIE)
        lpm_status = lpm.status if lpm.status == OK else WARN
        checks.append(dataclasses.replace(lpm, required=False, status=lpm_status))
        for program, label, required in PROGRAM_PROBES:
            checks.append(check_program(program, label, required, objects_dir))
        checks.extend(check_sensors())
    checks.append(check_native())
    checks.append(
        Check(
            "kprobe/fentry/lsm",
            INFO,
            "not needed: the agent uses cgroup hooks and tracepoints",
            required=False,
        )
    )
    return checks


def _render(checks: list[Check], out: TextIO) -> None:
    width = max(len(c.name) for c in checks)
    out.write(f"{'CHECK':<{width}}  STATUS  DETAIL\n")
    for c in checks:
        out.write(f"{c.name:<{width}}  {c.status:<6}  {c.detail}\n")
        if c.advice and c.status in (FAIL, WARN):
            out.write(f"{'':<{width}}  {'':<6}  -> {c.advice}\n")


def run_doctor(out: TextIO = sys.stdout, *, objects_dir: Path | None = None, as_json: bool = False) -> int:
    """Check this host and print a report.

    Args:
        out: Where to print.
        objects_dir: Directory holding ``probes.bpf.o`` (default: the packaged one).
        as_json: Print JSON (``{"ok": bool, "checks": [...]}``) instead of a table.

    Returns:
        0 when prevent mode can work here, 1 otherwise.
    """
    checks = run_checks(objects_dir)
    ok = not any(c.status == FAIL and c.required for c in checks)
    if as_json:
        json.dump({"ok": ok, "checks": [dataclasses.asdict(c) for c in checks]}, out, indent=2)
        out.write("\n")
    else:
        _render(checks, out)
        out.write("prevent mode can work on this host\n" if ok else "prevent mode CANNOT work on this host\n")
    return 0 if ok else 1


def _command(args: argparse.Namespace) -> int:
    return run_doctor(sys.stdout, as_json=bool(args.json))


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``doctor`` subcommand; its handler is ``args.func(args) -> int``.

    Args:
        subparsers: The result of ``parser.add_subparsers()``.

    Returns:
        The new subparser.
    """
    parser = subparsers.add_parser("doctor", help="check that this host can run the agent")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(func=_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the doctor as ``python -m loaders.doctor``."""
    parser = argparse.ArgumentParser(prog="doctor")
    parser.add_argument("--json", action="store_true")
    return run_doctor(as_json=parser.parse_args(argv).json)


if __name__ == "__main__":
    raise SystemExit(main())
