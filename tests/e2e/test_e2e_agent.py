"""End to end: the real `tool-pipeline run` (kernel + nats-server) watched by an independent subscriber."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest

from loaders import cgroup as cg
from pipeline.bus.credentials import load_credentials
from tests.kernel_support import require_kernel

REPO = Path(__file__).resolve().parents[2]

POLICY = """
apiVersion: tool/v1
kind: Policy
metadata: {name: e2e}
spec:
  defaults:
    detect: {egress: alert, ingress: alert, listen: alert, raw: alert}
    prevent: {egress: deny, ingress: alert, listen: alert, raw: deny}
  rules:
    - name: loopback-web
      action: allow
      direction: egress
      to: [127.0.0.1]
      ports: [1-1024]
    - name: no-discard
      action: deny
      direction: egress
      to: [127.0.0.0/8]
      ports: [9]
"""


@dataclass
class RunningAgent:
    proc: subprocess.Popen[bytes]
    state: Path
    cgroup: str
    audit: Path
    stderr: Path
    policy: Path

    def consumer_url(self) -> str:
        return load_credentials(self.state, "consumer").url_with_auth()

    def admin_url(self) -> str:
        """The agent's own credentials: the only ones allowed under tool.control.>."""
        return load_credentials(self.state, "agent").url_with_auth()

    def run_in_cgroup(self, code: str, *, user: int | None = None, timeout: float = 60) -> str:
        """Run Python code in a child process that lives in the agent's cgroup."""
        code = textwrap.dedent(code)
        if user is not None:  # drop privileges inside the interpreter (root's Python is not world-readable)
            code = f"import os, socket\nos.setgid({user})\nos.setuid({user})\n" + code
        out = subprocess.run(
            [sys.executable, "-c", code],
            preexec_fn=cg.enter(self.cgroup),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return out.stdout + out.stderr


def _wait_ready(agent: RunningAgent, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.proc.poll() is not None:
            raise AssertionError(f"agent exited with {agent.proc.returncode}:\n{agent.stderr.read_text()[-4000:]}")
        if "agent_running" in agent.stderr.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"agent not ready after {timeout}s:\n{agent.stderr.read_text()[-4000:]}")


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    require_kernel()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    state = tmp_path / "state"
    audit = tmp_path / "audit" / "audit.log"
    err = tmp_path / "agent.stderr"
    with cg.scratch_cgroup("tooltest-e2e") as path:
        with err.open("wb") as err_file:
            proc = subprocess.Popen(
                [
                    sys.executable, "-m", "pipeline.cli", "run",
                    "--cgroup", path, "--state-dir", str(state), "--audit-log", str(audit),
                    "--nats-port", "0", "--policy", str(policy),
                ],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=err_file,
            )  # fmt: skip
        running = RunningAgent(proc, state, path, audit, err, policy)
        try:
            _wait_ready(running)
            yield running
        finally:
            stop_agent(running.proc)  # a test may have restarted it: stop the one running now


def stop_agent(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it does not drain within 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Collector:
    """An independent subscriber (consumer credentials) collecting decoded events."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.subjects: list[str] = []

    def matching(self, **fields: Any) -> list[dict[str, Any]]:
        out = []
        for e in self.events:
            if all(_get(e, k) == v for k, v in fields.items()):
                out.append(e)
        return out


def _get(event: dict[str, Any], dotted: str) -> Any:
    value: Any = event
    for part in dotted.split("__"):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


async def _collect(
    url: str,
    collector: Collector,
    until: Any,
    timeout: float = 30,
    action: Any = None,
    subject: str = "tool.events.>",
) -> None:
    nc = await nats.connect(url)
    try:

        async def on_msg(msg: Any) -> None:
            collector.subjects.append(msg.subject)
            collector.events.append(json.loads(msg.data))

        await nc.subscribe(subject, cb=on_msg)
        await nc.flush()
        await nc.flush()
        if action is not None:
            await anyio.to_thread.run_sync(action)
        with anyio.move_on_after(timeout):
            while not until(collector):
                await anyio.sleep(0.05)
        if not until(collector):
            summary = [
                (
                    e.get("type"),
                    e.get("kind"),
                    e.get("verdict"),
                    (e.get("remote") or {}).get("port"),
                    (e.get("process") or {}).get("pid"),
                )
                for e in collector.events
            ]
            raise AssertionError(f"condition not met in {timeout}s; events seen: {summary[-40:]}")
    finally:
        await nc.close()


CLIENT = """
import socket
def tcp(port, host="127.0.0.1"):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect((host, port))
        print(port, "connected")
    except OSError as e:
        print(port, "errno", e.errno)
    finally:
        s.close()
"""


def test_connections_reach_a_subscriber_with_process_identity(agent: RunningAgent) -> None:
    """Allowed and refused connections from a short-lived process arrive on NATS with who, what and why."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]  # > 1024: decided by the default (alert in detect mode)
    outputs: list[str] = []

    def act() -> None:
        outputs.append(agent.run_in_cgroup(CLIENT + f"tcp(9)\ntcp({port})\n", user=65534))

    collector = Collector()

    def done(c: Collector) -> bool:
        return bool(c.matching(type="connection", remote__port=port)) and bool(
            c.matching(type="connection", remote__port=9)
        )

    try:
        anyio.run(lambda: _collect(agent.consumer_url(), collector, done, action=act))
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nchild printed: {outputs}") from None
    finally:
        srv.close()
    deny = collector.matching(type="connection", remote__port=9)[0]
    unknown = collector.matching(type="connection", remote__port=port)[0]
    # Detect mode: nothing is refused, the deny is reported as would-block.
    assert "9 connected" in outputs[0] or "9 errno 111" in outputs[0]
    assert deny["verdict"] == "would-block"
    assert deny["rule"]["name"] == "no-discard"
    assert deny["known"] is True
    assert deny["process"]["uid"] == 65534
    assert deny["process"]["user"] == "nobody"
    assert deny["process"]["exe"] == os.path.realpath(sys.executable)
    assert deny["process"]["comm"].startswith("python")
    assert deny["cgroup"]["path"] == "/" + os.path.relpath(agent.cgroup, cg.cgroup2_root())
    assert unknown["verdict"] == "alert" and unknown["known"] is False
    assert unknown["rule"]["id"] == 0 and "default" in unknown["rule"]["explanation"]
    assert unknown["anomaly"]["score"] > 0
    subject = collector.subjects[collector.events.index(deny)]
    assert subject.endswith(".connection.egress.would-block")


def test_switch_to_prevent_refuses_in_the_kernel(agent: RunningAgent) -> None:
    """Over tool.control.mode (agent credentials), prevent mode makes the kernel refuse; a consumer cannot switch."""

    async def consumer_tries() -> str:
        nc = await nats.connect(agent.consumer_url())
        try:
            await nc.request("tool.control.mode", b"detect", timeout=2)
            return "answered"
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            return type(exc).__name__
        finally:
            await nc.close()

    assert anyio.run(consumer_tries) in ("NoRespondersError", "TimeoutError")

    async def switch() -> dict[str, Any]:
        nc = await nats.connect(agent.admin_url())
        try:
            msg = await nc.request("tool.control.mode", b"prevent", timeout=5)
            return json.loads(msg.data)  # type: ignore[no-any-return]
        finally:
            await nc.close()

    assert anyio.run(switch) == {"mode": "prevent"}
    collector = Collector()
    outputs: list[str] = []

    def act() -> None:
        outputs.append(agent.run_in_cgroup(CLIENT + "tcp(9)\ntcp(4444)\n"))

    anyio.run(
        lambda: _collect(
            agent.consumer_url(),
            collector,
            lambda c: len(c.matching(type="connection", verdict="blocked")) >= 2,
            action=act,
        )
    )
    assert "9 errno 1" in outputs[0] and "4444 errno 1" in outputs[0]
    blocked = {e["remote"]["port"]: e for e in collector.matching(type="connection", verdict="blocked")}
    assert blocked[9]["rule"]["name"] == "no-discard"
    assert blocked[4444]["known"] is False and blocked[4444]["mode"] == "prevent"


def test_short_lived_process_is_named_by_its_executable(agent: RunningAgent) -> None:
    """A process that execs, connects and exits at once is still reported with its executable."""
    collector = Collector()
    curl_like = "/bin/sh"

    def act() -> None:
        subprocess.run(
            [curl_like, "-c",
             f"exec {sys.executable} -c 'import socket; socket.socket().connect_ex((\"127.0.0.1\", 7))'"],
            preexec_fn=cg.enter(agent.cgroup), check=True, timeout=30,
        )  # fmt: skip

    anyio.run(
        lambda: _collect(
            agent.consumer_url(),
            collector,
            lambda c: bool(c.matching(type="connection", remote__port=7)),
            action=act,
        )
    )
    ev = collector.matching(type="connection", remote__port=7)[0]
    assert ev["process"]["exe"] == os.path.realpath(sys.executable)
    assert "connect_ex" in " ".join(ev["process"]["cmdline"])
    execs = collector.matching(type="process", kind="exec", process__pid=ev["process"]["pid"])
    assert execs, "the exec event of the short-lived process was published"


def test_audit_log_is_root_only_and_lists_decisions(agent: RunningAgent) -> None:
    """The audit log exists with 0600 in a 0700 directory and has a line for a decision."""
    agent.run_in_cgroup(CLIENT + "tcp(9)\n")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if agent.audit.exists() and "rule=no-discard" in agent.audit.read_text():
            break
        time.sleep(0.1)
    assert stat.S_IMODE(agent.audit.stat().st_mode) == 0o600
    assert stat.S_IMODE(agent.audit.parent.stat().st_mode) == 0o700
    line = next(ln for ln in agent.audit.read_text().splitlines() if "rule=no-discard" in ln)
    assert "CONN" in line and "verdict=would-block" in line and "127.0.0.1:9/tcp" in line


def test_rejected_policy_keeps_the_old_one_and_is_published(agent: RunningAgent) -> None:
    """A broken policy file is rejected with file:line, announced on NATS, and the old policy stays in force."""
    collector = Collector()

    def act() -> None:
        agent.policy.write_text(POLICY.replace("action: deny", "action: dney"))
        os.kill(agent.proc.pid, signal.SIGHUP)

    anyio.run(
        lambda: _collect(
            agent.consumer_url(),
            collector,
            lambda c: bool(c.matching(type="policy", kind="rejected")),
            action=act,
        )
    )
    rejected = collector.matching(type="policy", kind="rejected")[0]
    assert any(f"{agent.policy}:" in e and "dney" in e for e in rejected["errors"])
    collector2 = Collector()
    anyio.run(
        lambda: _collect(
            agent.consumer_url(),
            collector2,
            lambda c: bool(c.matching(type="connection", remote__port=9)),
            action=lambda: agent.run_in_cgroup(CLIENT + "tcp(9)\n"),
        )
    )
    assert collector2.matching(type="connection", remote__port=9)[0]["rule"]["name"] == "no-discard"


def test_sigterm_drains_and_a_late_subscriber_catches_up(agent: RunningAgent) -> None:
    """Events made just before SIGTERM are all published; JetStream replays them to a late consumer."""
    marker_port = 1011
    agent.run_in_cgroup(CLIENT + "\n".join(f"tcp({marker_port})" for _ in range(3)))
    url = agent.consumer_url()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=60) == 0
    err = agent.stderr.read_text()
    assert "pipeline_drained" in err
    # Restart a bare nats-server on the same store? The agent's embedded server is gone with it,
    # so replay from a restarted agent (same state dir: same stream).
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "--cgroup", agent.cgroup, "--state-dir", str(agent.state),
         "--audit-log", str(agent.audit), "--nats-port", "0", "--policy", str(agent.policy)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=agent.stderr.open("ab"),
    )  # fmt: skip
    agent.proc = proc
    deadline = time.monotonic() + 60
    while agent.stderr.read_text().count("agent_running") < 2 and time.monotonic() < deadline:
        assert proc.poll() is None
        time.sleep(0.1)
    del url
    found: list[dict[str, Any]] = []

    async def replay() -> None:
        nc = await nats.connect(agent.consumer_url())
        try:
            js = nc.jetstream()
            sub = await js.subscribe(
                "tool.events.*.connection.>",
                ordered_consumer=True,
                deliver_policy=nats.js.api.DeliverPolicy.ALL,
            )
            with anyio.fail_after(20):
                while len([e for e in found if e["remote"]["port"] == marker_port]) < 1:
                    msg = await sub.next_msg(timeout=10)
                    found.append(json.loads(msg.data))
        finally:
            await nc.close()

    anyio.run(replay)
    assert any(e["remote"]["port"] == marker_port for e in found)


def test_ring_buffer_overrun_is_reported_and_adds_up(tmp_path: Path) -> None:
    """With a tiny ring buffer, what was lost is counted: received + lost == made, exactly."""
    require_kernel()
    config = tmp_path / "config.yaml"
    config.write_text("ringbuf_bytes: 4096\nflow_interval_ms: 0\nloss_report_interval_s: 0.5\naudit_log: ''\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    err = tmp_path / "agent.stderr"
    n = 20000
    with cg.scratch_cgroup("tooltest-e2e") as path:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", "--config", str(config), "--cgroup", path,
             "--state-dir", str(tmp_path / "state"), "--nats-port", "0", "--policy", str(policy)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=err.open("wb"),
        )  # fmt: skip
        agent = RunningAgent(proc, tmp_path / "state", path, tmp_path / "none", err, policy)
        try:
            _wait_ready(agent)
            collector = Collector()
            pids: list[int] = []

            def act() -> None:
                out = agent.run_in_cgroup(f"""
                    import os, socket
                    print(os.getpid())
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    for i in range({n}):
                        s.sendto(b"x", ("127.0.0.1", 20000 + i % 30000))
                """)
                pids.append(int(out.split()[0]))

            def settled(c: Collector) -> bool:
                if not pids:
                    return False
                exits = c.matching(type="process", kind="exit", process__pid=pids[0])
                losses = c.matching(type="loss")
                if not losses:
                    return False
                conn = len(c.matching(type="connection", process__pid=pids[0]))
                procs = len(c.matching(type="process", process__pid=pids[0]))
                lost = losses[-1]["ring_buffer_full"]
                return bool(exits or lost) and conn + procs + lost >= n + 2

            try:
                anyio.run(lambda: _collect(agent.consumer_url(), collector, settled, timeout=90, action=act))
            except AssertionError:
                pid = pids[0] if pids else -1
                raise AssertionError(
                    f"pid={pid} conn={len(collector.matching(type='connection', process__pid=pid))} "
                    f"procs={len(collector.matching(type='process', process__pid=pid))} "
                    f"all={len(collector.events)} last loss={collector.matching(type='loss')[-1:]}"
                ) from None
            pid = pids[0]
            conn = len(collector.matching(type="connection", process__pid=pid))
            procs = len(collector.matching(type="process", process__pid=pid))
            lost = collector.matching(type="loss")[-1]["ring_buffer_full"]
            assert lost > 0, "a 4 KiB ring buffer should overflow"
            assert conn + procs + lost == n + 2  # every datagram, plus its exec and exit
            assert "events_lost" in err.read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def test_policy_file_change_is_applied_without_signal(agent: RunningAgent) -> None:
    """Editing the policy file swaps the new policy into the kernel: the next decision uses it."""
    collector = Collector()

    def act() -> None:
        agent.policy.write_text(POLICY.replace("ports: [9]", "ports: [9, 13]"))

    anyio.run(
        lambda: _collect(
            agent.consumer_url(),
            collector,
            lambda c: bool(c.matching(type="policy", kind="loaded")),
            action=act,
        )
    )
    loaded = collector.matching(type="policy", kind="loaded")[-1]
    assert loaded["generation"] >= 2
    collector2 = Collector()
    anyio.run(
        lambda: _collect(
            agent.consumer_url(),
            collector2,
            lambda c: bool(c.matching(type="connection", remote__port=13)),
            action=lambda: agent.run_in_cgroup(CLIENT + "tcp(13)\n"),
        )
    )
    ev = collector2.matching(type="connection", remote__port=13)[0]
    assert ev["rule"]["name"] == "no-discard" and ev["verdict"] == "would-block"


def test_api_answers_status_and_validates_policies(agent: RunningAgent) -> None:
    """tool.api.status, tool.api.policy and tool.api.policy.validate answer a consumer; bad input gets an error."""

    async def ask() -> tuple[dict[str, Any], ...]:
        nc = await nats.connect(agent.consumer_url())
        try:
            replies = []
            for subject, body in (
                ("tool.api.status", b""),
                ("tool.api.policy", b""),
                ("tool.api.policy.validate", POLICY.encode()),
                ("tool.api.policy.validate", POLICY.replace("egress", "egres").encode()),
            ):
                msg = await nc.request(subject, body, timeout=10)
                replies.append(json.loads(msg.data))
            return tuple(replies)
        finally:
            await nc.close()

    async def bad_mode() -> dict[str, Any]:
        nc = await nats.connect(agent.admin_url())
        try:
            msg = await nc.request("tool.control.mode", b"block-everything", timeout=10)
            return json.loads(msg.data)  # type: ignore[no-any-return]
        finally:
            await nc.close()

    status, policy, good, bad = anyio.run(ask)
    wrong_mode = anyio.run(bad_mode)
    assert status["mode"] == "detect" and "tool_connect4" in status["programs_attached"]
    assert [r["name"] for r in policy["rules"]] == ["loopback-web", "no-discard"]
    assert good["valid"] is True and good["rules"] == 2
    assert bad["valid"] is False
    assert any("egres" in e["message"] and e["line"] > 0 for e in bad["errors"])
    assert "error" in wrong_mode and "detect" in wrong_mode["error"]


def _start(
    tmp_path: Path, cgroup_path: str, config: str, env: dict[str, str] | None = None, policy_text: str = POLICY
) -> RunningAgent:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config)
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text)
    err = tmp_path / "agent.stderr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "--config", str(cfg), "--cgroup", cgroup_path,
         "--state-dir", str(tmp_path / "state"), "--nats-port", "0", "--policy", str(policy)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=err.open("wb"), env={**os.environ, **(env or {})},
    )  # fmt: skip
    agent = RunningAgent(proc, tmp_path / "state", cgroup_path, tmp_path / "audit.log", err, policy)
    _wait_ready(agent)
    return agent


def test_agent_exports_opentelemetry_to_a_real_otlp_receiver(tmp_path: Path) -> None:
    """Decisions reach an OTLP/gRPC receiver as metrics (incl. ring buffer fill, stage latency), logs and spans."""
    from tests.outputs.otlp_receiver import attributes, grpc_receiver

    require_kernel()
    with grpc_receiver() as (receiver, endpoint), cg.scratch_cgroup("tooltest-e2e") as path:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_BLRP_SCHEDULE_DELAY": "200",
        }
        agent = _start(tmp_path, path, "audit_log: ''\n", env)
        try:
            agent.run_in_cgroup(CLIENT + "tcp(9)\n")

            def arrived(got: Any) -> bool:
                names = {m.name for m in got.metrics}
                logs = [attributes(r.attributes) for r in got.logs]
                return (
                    {"tool.connections", "tool.ringbuffer.fill", "tool.stage.latency"} <= names
                    and any(a.get("network.peer.port") == 9 for a in logs)
                    and any(s.name == "connection.decision" for s in got.spans)
                )

            got = receiver.wait_for(arrived, timeout=30)
        finally:
            stop_agent(agent.proc)
    log = next(attributes(r.attributes) for r in got.logs if attributes(r.attributes).get("network.peer.port") == 9)
    assert log["tool.verdict"] == "would-block" and log["tool.rule.name"] == "no-discard"
    stages = {
        attributes(p.attributes).get("stage")
        for m in got.metrics if m.name == "tool.stage.latency"
        for p in m.histogram.data_points
    }  # fmt: skip
    assert {"decode", "enrich", "match", "score"} <= stages


def test_prevent_mode_blocks_an_anomalous_destination_by_itself(tmp_path: Path) -> None:
    """With anomaly.action block-destination, a never-seen destination gets a kernel deny and an event."""
    require_kernel()
    config = (
        "mode: prevent\naudit_log: ''\nanomaly: {threshold: 0.9, action: block-destination, warmup_observations: 0}\n"
    )
    with cg.scratch_cgroup("tooltest-e2e") as path:
        agent = _start(tmp_path, path, config)
        try:
            collector = Collector()
            anyio.run(lambda: _collect(agent.consumer_url(), collector,
                                       lambda c: bool(c.matching(type="enforcement")),
                                       action=lambda: agent.run_in_cgroup(CLIENT + "tcp(80)\n")))  # fmt: skip
            enforcement = collector.matching(type="enforcement")[0]
            assert enforcement["action"] == "block-destination"
            assert enforcement["remote"] == {"address": "127.0.0.1", "port": 80}
            assert enforcement["exe"] == os.path.realpath(sys.executable)
            again = Collector()
            out: list[str] = []

            def act() -> None:
                out.append(agent.run_in_cgroup(CLIENT + "tcp(80)\n"))

            def blocked_seen(c: Collector) -> bool:
                return bool(c.matching(type="connection", verdict="blocked"))

            anyio.run(lambda: _collect(agent.consumer_url(), again, blocked_seen, action=act))
            assert "80 errno 1" in out[0]
            blocked = again.matching(type="connection", verdict="blocked")[0]
            assert blocked["rule"]["name"] == "anomaly-block-1"
        finally:
            stop_agent(agent.proc)


def test_bad_policy_or_config_at_start_is_refused_with_where(tmp_path: Path) -> None:
    """A broken policy stops the start with file:line and attaches nothing; a bad config value says where."""
    bad = tmp_path / "bad.yaml"
    wrong = POLICY.replace("direction: egress\n      to: [127.0.0.1]", "direction: outbound\n      to: [127.0.0.1]")
    bad.write_text(wrong)
    run = [sys.executable, "-m", "pipeline.cli", "run", "--state-dir", str(tmp_path / "s"), "--nats-port", "0"]
    out = subprocess.run([*run, "--policy", str(bad)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert f"{bad}:" in out.stderr and "outbound" in out.stderr and "nothing was attached" in out.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mode: detect\nflow_interval: 5\n")
    out = subprocess.run([*run, "--config", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"{cfg}:2:1:" in out.stderr and "flow_interval_ms" in out.stderr
    out = subprocess.run([*run, "--mode", "block"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def _audit_writer_pids(stderr: Path) -> list[int]:
    """The pids of the audit writer processes the agent started, in order (from its log)."""
    pids = []
    for line in stderr.read_text().splitlines():
        if "audit_writer_started" in line:
            pids.append(int(json.loads(line)["pid"]))
    return pids


def test_audit_writer_runs_apart_and_writes_every_event_before_the_agent_exits(tmp_path: Path) -> None:
    """The audit lines come from their own process; SIGTERM right after a burst loses none."""
    require_kernel()
    sends = 3000
    with cg.scratch_cgroup("tooltest-e2e") as path:
        agent = _start(tmp_path, path, f"flow_interval_ms: 0\naudit_log: {tmp_path / 'audit.log'}\n")
        try:
            [pid] = _audit_writer_pids(agent.stderr)
            assert pid != agent.proc.pid
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert b"pipeline.outputs.audit_process" in cmdline
            assert int(Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[1]) == agent.proc.pid
            out = agent.run_in_cgroup(
                "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                f"for _ in range({sends}):\n    s.sendto(b'x', ('127.0.0.1', 1013))\nprint('sent')\n"
            )
            assert "sent" in out
        finally:
            stop_agent(agent.proc)
        assert agent.proc.returncode == 0
        lines = agent.audit.read_text().splitlines()
    conn = [ln for ln in lines if " CONN " in ln and "->127.0.0.1:1013/udp" in ln]
    assert len(conn) == sends, f"{len(conn)} CONN lines for {sends} datagrams"
    assert "event=stopped" in lines[-1]
    assert not Path(f"/proc/{pid}").exists()


def test_a_killed_audit_writer_is_restarted_and_says_so(tmp_path: Path) -> None:
    """kill -9 of the writer: the agent starts another, which notes the outage in the log."""
    require_kernel()
    with cg.scratch_cgroup("tooltest-e2e") as path:
        agent = _start(tmp_path, path, f"audit_log: {tmp_path / 'audit.log'}\n")
        try:
            [first] = _audit_writer_pids(agent.stderr)
            os.kill(first, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while len(_audit_writer_pids(agent.stderr)) < 2:
                assert time.monotonic() < deadline, agent.stderr.read_text()[-3000:]
                time.sleep(0.1)
            assert "audit_writer_died" in agent.stderr.read_text()
            agent.run_in_cgroup(CLIENT + "tcp(1014)")
            deadline = time.monotonic() + 30
            while "->127.0.0.1:1014/tcp" not in agent.audit.read_text():
                assert time.monotonic() < deadline, agent.audit.read_text()[-3000:]
                time.sleep(0.1)
        finally:
            stop_agent(agent.proc)
        text = agent.audit.read_text()
    [restart] = [ln for ln in text.splitlines() if "event=writer_restarted" in ln]
    assert "restarts=1" in restart and "signal 9" in restart


def test_a_cgroup_created_after_the_load_gets_its_rules(tmp_path: Path) -> None:
    """A cgroup matching a selector appears while the agent runs (a new container): its rule applies."""
    require_kernel()
    with cg.scratch_cgroup("tooltest-e2e") as path:
        rel = os.path.relpath(path, cg.cgroup2_root())
        policy = f"""
apiVersion: tool/v1
kind: Policy
metadata: {{name: late}}
spec:
  defaults:
    prevent: {{egress: deny, ingress: allow, listen: allow, raw: deny}}
  rules:
    - name: late-workers
      action: allow
      direction: egress
      who: {{cgroup: ["/{rel}/worker-*"]}}
      to: [127.0.0.1]
      ports: [1015]
"""
        agent = _start(tmp_path, path, "mode: prevent\naudit_log: ''\n", policy_text=policy)
        late = os.path.join(path, "worker-1")
        try:
            assert "cgroup_watch_started" in agent.stderr.read_text()
            os.mkdir(late)
            deadline = time.monotonic() + 20
            while "policy_reapplied" not in agent.stderr.read_text():
                assert time.monotonic() < deadline, agent.stderr.read_text()[-3000:]
                time.sleep(0.05)
            code = CLIENT + "tcp(1015)"
            inside = subprocess.run(
                [sys.executable, "-c", code], preexec_fn=cg.enter(late), capture_output=True, text=True, timeout=60
            ).stdout
            outside = agent.run_in_cgroup(code)
        finally:
            stop_agent(agent.proc)
            os.rmdir(late)
    # Nothing listens on 1015: allowed means the kernel let the SYN out (refused by the peer).
    assert "1015 errno 111" in inside, inside
    assert "1015 errno 1" in outside and "errno 111" not in outside, outside


def test_a_sigkilled_agent_leaves_no_nats_server_or_audit_writer_behind(tmp_path: Path) -> None:
    """kill -9 (the OOM killer): its children get the parent-death signal and exit."""
    require_kernel()
    with cg.scratch_cgroup("tooltest-e2e") as path:
        agent = _start(tmp_path, path, f"audit_log: {tmp_path / 'audit.log'}\n")
        [writer] = _audit_writer_pids(agent.stderr)
        [server] = [
            int(json.loads(ln)["pid"]) for ln in agent.stderr.read_text().splitlines() if "nats_server_started" in ln
        ]
        agent.proc.kill()
        agent.proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        alive = [writer, server]
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [pid for pid in alive if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        assert not alive, f"still running after the agent was killed: {alive}"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"
