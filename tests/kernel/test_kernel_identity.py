"""Who did it: exec attribution of short-lived processes, and exe/user/cgroup/comm-scoped rules."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterator

import pytest

from loaders import abi
from pipeline.decode import ConnRecord
from tests.kernel.kernel_harness import CHILD, NOBODY, PYTHON, REAL_PYTHON, Harness, SubCgroups, exec_records

pytestmark = pytest.mark.kernel

PORT = 40011
OTHER_PORT = 40012


def udp_connect(port: int = PORT) -> tuple[object, ...]:
    return ("connect", socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", port, 1.0)


def allow_rule(who: dict[str, object], port: int = PORT) -> dict[str, object]:
    return {"name": f"allow-{port}", "action": "allow", "direction": "egress", "to": ["127.0.0.1"],
            "ports": [port], "who": who}  # fmt: skip


def test_exec_then_connect_is_attributed_to_the_executable(h: Harness) -> None:
    """sh execs python which connects at once: the exec event and the connection share tgid and exec_id."""
    compiled, _ = h.apply([allow_rule({"exe": [REAL_PYTHON]})])
    ops = json.dumps([list(udp_connect())])
    script = f"exec {PYTHON} -c \"$1\" '{ops}'"
    child = h.argv(["/bin/sh", "-c", script, "sh", CHILD])
    assert child.returncode == 0 and json.loads(child.results[0]) == ["ok"], child.stderr
    records = h.drain()
    conns = [r for r in records if isinstance(r, ConnRecord) and r.remote_port == PORT]
    assert len(conns) == 1
    conn = conns[0]
    execs = [r for r in exec_records(records, conn.task.tgid) if r.kind == abi.EV_EXEC]
    assert [os.path.basename(e.filename) for e in execs][-1] == os.path.basename(PYTHON)
    last = execs[-1]
    assert (last.task.tgid, last.task.exec_id) == (conn.task.tgid, conn.task.exec_id)
    st = os.stat(REAL_PYTHON)
    assert (last.exe_ino, last.exe_dev) == (st.st_ino, abi.kernel_dev(st.st_dev))
    assert (conn.verdict, conn.rule_id) == (abi.VERDICT_ALLOW, compiled.rule_id(f"allow-{PORT}"))
    exits = [r for r in exec_records(records, conn.task.tgid) if r.kind == abi.EV_EXIT]
    assert len(exits) == 1 and exits[0].task.exec_id == conn.task.exec_id


def test_exe_rule_allows_python_and_denies_another_executable(h: Harness, tmp_path: os.PathLike[str]) -> None:
    """An exe-scoped allow matches the real python binary; another executable gets the deny default."""
    compiled, _ = h.apply([allow_rule({"exe": [REAL_PYTHON]})])
    child = h.run([udp_connect()])
    assert child.results == ["ok"]
    (r,) = h.conns(child.pid, abi.EV_CONNECT)
    assert r.rule_id == compiled.rule_id(f"allow-{PORT}")

    bash = shutil.which("bash")
    assert bash is not None
    other = h.argv([bash, "-c", f"exec 3<>/dev/udp/127.0.0.1/{PORT} && echo ok || echo refused"])
    assert other.results == ["refused"], other.stderr
    blocked = [r for r in h.drain() if isinstance(r, ConnRecord) and r.remote_port == PORT]
    assert [(r.verdict, r.rule_id, r.task.comm) for r in blocked] == [(abi.VERDICT_BLOCK, 0, "bash")]


def test_user_rule(h: Harness) -> None:
    """who: user [65534] allows a process running as nobody and not one running as root."""
    compiled, _ = h.apply([allow_rule({"user": [NOBODY]})])
    # The interpreter lives under /root (mode 0700), so the child drops to nobody itself before connecting.
    as_nobody = h.run([("setuid", NOBODY), udp_connect()])
    assert as_nobody.results == ["ok", "ok"], as_nobody.stderr
    (r,) = h.conns(as_nobody.pid, abi.EV_CONNECT)
    assert (r.task.uid, r.task.gid, r.verdict, r.rule_id) == (
        NOBODY, NOBODY, abi.VERDICT_ALLOW, compiled.rule_id(f"allow-{PORT}"),
    )  # fmt: skip
    as_root = h.run([udp_connect()])
    assert as_root.results == ["EPERM"]
    (r,) = h.conns(as_root.pid, abi.EV_CONNECT)
    assert (r.task.uid, r.verdict, r.rule_id) == (0, abi.VERDICT_BLOCK, 0)


def test_comm_rule(h: Harness) -> None:
    """who: comm matches the process name the task has when it connects."""
    compiled, _ = h.apply([allow_rule({"comm": ["tool-test-ok"]})])
    named = h.run([("comm", "tool-test-ok"), udp_connect()])
    assert named.results == ["ok", "ok"]
    (r,) = h.conns(named.pid, abi.EV_CONNECT)
    assert (r.task.comm, r.rule_id) == ("tool-test-ok", compiled.rule_id(f"allow-{PORT}"))
    other = h.run([("comm", "tool-test-no"), udp_connect()])
    assert other.results == ["ok", "EPERM"]


@pytest.fixture
def subs(harness: Harness) -> Iterator[SubCgroups]:
    sc = SubCgroups(harness.cgroup_path)
    try:
        yield sc
    finally:
        sc.cleanup()


def test_cgroup_rule(h: Harness, subs: SubCgroups) -> None:
    """who: cgroup covers that cgroup and the ones below it, and no sibling."""
    a, b = subs.make("a"), subs.make("b")
    rel_a = f"{h.cgroup_rel}/a"
    compiled, _ = h.apply(
        [allow_rule({"cgroup": [rel_a]}), allow_rule({"cgroup": [h.cgroup_rel]}, OTHER_PORT)]
    )
    ops = [udp_connect(PORT), udp_connect(OTHER_PORT)]
    in_a = h.run(ops, cgroup_path=a)
    in_b = h.run(ops, cgroup_path=b)
    assert (in_a.results, in_b.results) == (["ok", "ok"], ["EPERM", "ok"])
    records = h.drain()
    by = {
        (r.task.tgid, r.remote_port): (r.verdict, r.rule_id, r.task.cgroup_id)
        for r in records
        if isinstance(r, ConnRecord)
    }
    ida, idb = os.stat(a).st_ino, os.stat(b).st_ino
    assert by[(in_a.pid, PORT)] == (abi.VERDICT_ALLOW, compiled.rule_id(f"allow-{PORT}"), ida)
    assert by[(in_b.pid, PORT)] == (abi.VERDICT_BLOCK, 0, idb)
    assert by[(in_b.pid, OTHER_PORT)] == (abi.VERDICT_ALLOW, compiled.rule_id(f"allow-{OTHER_PORT}"), idb)


def test_the_program_an_old_kernel_refuses_is_named_from_the_verifier_log() -> None:
    """Sensors.load drops an optional program the kernel refuses; it finds which one in libbpf's real log."""
    from pathlib import Path

    import pytest

    from loaders import BpfObject, errors
    from loaders.sensors import _rejected_program
    from tests.kernel_support import require_kernel

    require_kernel()
    test_object = Path(__file__).resolve().parents[1] / "loaders" / "data" / "test_progs.bpf.o"
    with BpfObject.open(test_object) as obj:
        obj.program("bad_prog").set_autoload(True)
        with pytest.raises(errors.VerifierError) as info:
            obj.load()
    assert _rejected_program(info.value.log) == "bad_prog"
