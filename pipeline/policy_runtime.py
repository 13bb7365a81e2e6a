"""The policy in force: load, compile and swap into the kernel; reject a bad one and keep the old.

Also holds the dynamic rules the enforcement stage adds at run time (for
example "deny this destination to this executable"), which survive reloads.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import threading
import time
from collections import ChainMap
from dataclasses import dataclass
from pathlib import Path

import structlog

from loaders.sensors import KernelTables, Sensors, TablesError, build_tables, resolve_cgroups
from pipeline.policy import CompiledPolicy, PolicyError, compile_policy, load_policy
from pipeline.policy.compiler import KernelRule, RuleInfo, WhoClass

log = structlog.get_logger("tool.policy")

DEFAULT_POLICY = Path(__file__).parent / "data" / "default-policy.yaml"
DYNAMIC_RULE_BASE = 1_000_000


@dataclass(frozen=True)
class DynamicDeny:
    """A deny the agent added by itself (e.g. an anomalous destination)."""

    exe: str
    network: ipaddress.IPv6Network
    port: int
    protocol: int
    reason: str


@dataclass(frozen=True)
class LoadResult:
    """What a (re)load did."""

    ok: bool
    generation: int
    rules: int
    sources: list[str]
    errors: list[str]
    warnings: list[str]
    duration_ms: float


class PolicyRuntime:
    """Owns the compiled policy and writes it into the sensors.

    Args:
        sensors: the attached sensors (None: compile and check only).
        paths: policy files or directories (empty: the shipped default policy).
        cgroup_root: cgroup v2 mount, to resolve cgroup selectors.
    """

    def __init__(self, sensors: Sensors | None, paths: list[str], cgroup_root: str) -> None:
        self.sensors = sensors
        self.paths = [Path(p) for p in paths] or [DEFAULT_POLICY]
        self.cgroup_root = cgroup_root
        self.compiled: CompiledPolicy | None = None
        self.dynamic: list[DynamicDeny] = []
        self.generation = 0
        self._history: dict[int, CompiledPolicy] = {}  # generation -> policy with its dynamic rules
        self._mtimes: dict[str, float] = {}
        # Reloads, re-applies (a new cgroup) and dynamic denies run in worker threads: one swap
        # at a time, each with the policy then in force (the kernel's inactive slot is shared).
        self._swap_lock = threading.Lock()
        self._cgroup_ids: set[int] = set()  # the cgroup ids in the kernel's tables

    def _with_dynamic(self, compiled: CompiledPolicy) -> CompiledPolicy:
        if not self.dynamic:
            return compiled
        classes = list(compiled.who_classes)
        entries = list(compiled.entries)
        # The compiled rules stay as they are (described on demand); the dynamic ones go in front.
        rules: ChainMap[int, RuleInfo] = ChainMap({}, compiled.rules)  # type: ignore[arg-type]
        by_exe: dict[str, int] = {}
        for i, d in enumerate(self.dynamic):
            cls_id = by_exe.get(d.exe)
            if cls_id is None:
                cls_id = len(classes)
                classes.append(WhoClass(id=cls_id, exe=[d.exe]))
                by_exe[d.exe] = cls_id
            rule_id = DYNAMIC_RULE_BASE + i
            entries.append(KernelRule(rule_id, cls_id, "egress", d.protocol, d.network, d.port, d.port, "deny"))
            rules[rule_id] = RuleInfo(
                name=f"anomaly-block-{i + 1}",
                description=d.reason,
                source="enforcement stage",
                action="deny",
                audit=False,
                explanation=f"deny {d.exe} to {d.network.network_address}:{d.port} ({d.reason})",
            )
        return dataclasses.replace(compiled, who_classes=classes, entries=entries, rules=rules)

    def _apply(self, compiled: CompiledPolicy) -> tuple[int, KernelTables | None]:
        full = self._with_dynamic(compiled)
        if self.sensors is None:
            return self.generation, None
        tables = build_tables(full, self.cgroup_root)
        self._cgroup_ids = set(tables.cgroup)
        for what in tables.unresolved:
            log.warning("policy_selector_unresolved", selector=what)
        generation = self.sensors.apply_policy(tables)
        self._history[generation] = full
        for old in sorted(self._history)[:-8]:
            del self._history[old]
        return generation, tables

    def load(self) -> LoadResult:
        """Load the files, compile, and swap into the kernel. On any error the running policy stays."""
        started = time.perf_counter()
        sources = [str(p) for p in self.paths]
        try:
            loaded = load_policy(self.paths)
            compiled = compile_policy(loaded)
            with self._swap_lock:
                generation, _ = self._apply(compiled)
                self.compiled = compiled
                self.generation = generation
        except PolicyError as exc:
            return self._rejected(started, sources, [str(e) for e in exc.errors])
        except TablesError as exc:
            return self._rejected(started, sources, [str(exc)])
        self._mtimes = self._snapshot()
        result = LoadResult(
            True,
            generation,
            len(compiled.rules),
            compiled.sources,
            [],
            list(compiled.warnings),
            (time.perf_counter() - started) * 1000,
        )
        log.info(
            "policy_loaded",
            generation=generation,
            rules=result.rules,
            sources=result.sources,
            duration_ms=round(result.duration_ms, 1),
        )
        for w in compiled.warnings:
            log.warning("policy_warning", warning=w)
        return result

    def _rejected(self, started: float, sources: list[str], errors: list[str]) -> LoadResult:
        log.error("policy_rejected", errors=errors, kept_generation=self.generation)
        return LoadResult(False, self.generation, 0, sources, errors, [], (time.perf_counter() - started) * 1000)

    def add_dynamic_deny(self, deny: DynamicDeny) -> int:
        """Add a deny on top of the policy files and swap it in.

        Returns:
            The new generation.
        """
        if any(d.exe == deny.exe and d.network == deny.network and d.port == deny.port for d in self.dynamic):
            return self.generation
        with self._swap_lock:
            self.dynamic.append(deny)
            assert self.compiled is not None
            try:
                self.generation, _ = self._apply(self.compiled)
            except TablesError:
                self.dynamic.pop()
                raise
            return self.generation

    def cgroup_patterns(self) -> list[str]:
        """The cgroup selectors (``cgroup``, ``unit``, ``container``) of the policy in force."""
        if self.compiled is None:
            return []
        return sorted({p for wc in self.compiled.who_classes for p in (wc.cgroup or [])})

    def cgroups_moved(self) -> bool:
        """Whether the cgroup selectors now resolve to other cgroups than the tables in force hold."""
        with self._swap_lock:
            applied = self._cgroup_ids
        return resolve_cgroups(self.cgroup_patterns(), self.cgroup_root) != applied

    def reapply(self, reason: str) -> LoadResult:
        """Swap the policy in force in again, resolving its selectors anew (a cgroup appeared).

        The files are not read again. A failure keeps the policy in force (as :meth:`load`).
        """
        started = time.perf_counter()
        with self._swap_lock:  # the policy in force now, not one a reload is replacing
            assert self.compiled is not None
            compiled = self.compiled
            try:
                generation, _ = self._apply(compiled)
            except TablesError as exc:
                return self._rejected(started, compiled.sources, [str(exc)])
            self.generation = generation
        result = LoadResult(
            True, generation, len(compiled.rules), compiled.sources, [], [], (time.perf_counter() - started) * 1000
        )
        log.info("policy_reapplied", reason=reason, generation=generation, duration_ms=round(result.duration_ms, 1))
        return result

    def _snapshot(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for p in self.paths:
            if p.is_dir():
                for child in sorted(p.iterdir()):
                    if child.suffix in (".yaml", ".yml", ".json", ".cue"):
                        out[str(child)] = _mtime(child)
            else:
                out[str(p)] = _mtime(p)
        return out

    def changed(self) -> bool:
        """Whether a policy file was added, removed or modified since the last load attempt."""
        now = self._snapshot()
        if now != self._mtimes:
            self._mtimes = now
            return True
        return False

    def describe(self, rule_id: int, generation: int = 0) -> tuple[str | None, str | None, str]:
        """(rule name, source, explanation) of a rule id (0: the default) in the policy of a generation."""
        policy = self._history.get(generation) or (
            self._with_dynamic(self.compiled) if self.compiled is not None else None
        )
        if policy is None or rule_id == 0:
            return None, None, ""
        info = policy.rules.get(rule_id)
        if info is None:
            return None, None, ""
        return info.name, info.source, info.explanation


def _mtime(p: Path) -> float:
    try:
        return os.stat(p).st_mtime
    except OSError:
        return -1.0
