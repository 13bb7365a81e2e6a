"""The reference evaluator: decides one flow exactly as the kernel must, in plain Python."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.policy.addresses import to_v6_address
from pipeline.policy.compiler import ACTION_RANK, PROTOCOL_NUMBERS, CompiledPolicy, WhoClass, compile_policy
from pipeline.policy.globs import glob_match
from pipeline.policy.loader import LoadedPolicy

Verdict = Literal["allowed", "blocked", "would-block", "alert"]
AgentMode = Literal["detect", "prevent"]

_VERDICTS: dict[str, dict[str, Verdict]] = {
    "detect": {"allow": "allowed", "alert": "alert", "deny-audit": "would-block", "deny": "would-block"},
    "prevent": {"allow": "allowed", "alert": "alert", "deny-audit": "would-block", "deny": "blocked"},
}


@dataclass(frozen=True, slots=True)
class Flow:
    """One connection attempt as the kernel sees it.

    ``remote_addr`` is the peer for egress and ingress and the local bound address for listen;
    ``port`` is the remote port for egress and the local port for ingress and listen. Raw flows
    ignore address, port and protocol. ``cgroup`` is relative to the cgroup2 root.
    """

    direction: str
    protocol: str | int = "tcp"
    remote_addr: str = "::"
    port: int = 0
    exe: str | None = None
    comm: str | None = None
    uid: int | None = None
    gid: int | None = None
    cgroup: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one flow. ``rule_id`` 0 means no rule matched and the default decided."""

    verdict: Verdict
    rule_id: int
    action: str
    known: bool
    explanation: str
    rule_name: str = ""


def who_matches(cls: WhoClass, flow: Flow) -> bool:
    """Return whether the process of ``flow`` satisfies every condition of ``cls``."""
    if cls.exe is not None and (flow.exe is None or not any(glob_match(p, flow.exe) for p in cls.exe)):
        return False
    if cls.comm is not None and (flow.comm is None or not any(glob_match(p, flow.comm) for p in cls.comm)):
        return False
    if cls.uid is not None and (flow.uid is None or flow.uid not in cls.uid):
        return False
    if cls.gid is not None and (flow.gid is None or flow.gid not in cls.gid):
        return False
    if cls.cgroup is not None:
        # A cgroup selector covers that cgroup and every cgroup below it (as the kernel
        # checks the process's cgroup and each of its ancestors).
        path = (flow.cgroup or "").strip("/")
        parts = path.split("/") if path else []
        candidates = ["/".join(parts[:i]) for i in range(len(parts), -1, -1)]
        if flow.cgroup is None or not any(glob_match(p.strip("/"), c) for p in cls.cgroup for c in candidates):
            return False
    return True


def protocol_number(protocol: str | int) -> int:
    """Map 'tcp'/'udp' (or a number) to the IP protocol number."""
    if isinstance(protocol, int):
        return protocol
    return PROTOCOL_NUMBERS[protocol]


def evaluate(policy: CompiledPolicy | LoadedPolicy, flow: Flow, mode: AgentMode | str) -> Decision:
    """Decide ``flow`` under ``policy`` for the agent ``mode``.

    Among all matching rules the highest action wins (deny > audit deny > alert > allow); the
    reported rule is the first (lowest id) with that action. With no match, the default for
    (mode, direction) decides and the flow is unknown.

    Args:
        policy: A compiled policy (a loaded one is compiled first).
        flow: The flow to decide.
        mode: ``detect`` (never blocks) or ``prevent``.

    Returns:
        The decision.

    Raises:
        ValueError: Unknown mode, or the flow's address is not an IP address.
    """
    if mode not in _VERDICTS:
        raise ValueError(f"unknown agent mode {mode!r}, expected 'detect' or 'prevent'")
    compiled = policy if isinstance(policy, CompiledPolicy) else compile_policy(policy)
    raw = flow.direction == "raw"
    addr = None if raw else to_v6_address(flow.remote_addr)
    proto = None if raw else protocol_number(flow.protocol)
    best_rank, best_rule, best_action = -1, 0, ""
    matched_classes: dict[int, bool] = {}
    for entry in compiled.entries:
        if entry.direction != flow.direction:
            continue
        if not raw and (
            entry.protocol != proto
            or addr not in entry.network
            or not entry.port_lo <= flow.port <= entry.port_hi
        ):
            continue
        rank = ACTION_RANK[entry.action]
        if rank < best_rank or (rank == best_rank and entry.rule_id >= best_rule):
            continue
        if entry.who_class not in matched_classes:
            matched_classes[entry.who_class] = who_matches(compiled.who_classes[entry.who_class], flow)
        if matched_classes[entry.who_class]:
            best_rank, best_rule, best_action = rank, entry.rule_id, entry.action
    verdicts = _VERDICTS[mode]
    if best_rule:
        info = compiled.rules[best_rule]
        return Decision(
            verdicts[best_action],
            best_rule,
            best_action,
            True,
            f"rule '{info.name}': {info.explanation}",
            info.name,
        )
    default = compiled.defaults[mode][flow.direction]
    return Decision(
        verdicts[default],
        0,
        default,
        False,
        f"no rule matches; the default for {flow.direction} in {mode} mode is {default}",
    )
