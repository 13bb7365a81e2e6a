"""The policy language: load, check, compile and evaluate network policies.

Typical use::

    pol = load_policy([Path("/etc/tool/policy.d")])
    compiled = compile_policy(pol)
    decision = evaluate(compiled, Flow("egress", "tcp", "10.0.0.5", 5432, exe="/usr/sbin/nginx"), "prevent")
"""

from __future__ import annotations

from pipeline.policy.compiler import CompiledPolicy, KernelRule, RuleInfo, WhoClass, compile_policy
from pipeline.policy.diagnostics import Diagnostic, PolicyError
from pipeline.policy.evaluate import Decision, Flow, evaluate
from pipeline.policy.loader import LoadedPolicy, load_policy

__all__ = [
    "CompiledPolicy",
    "Decision",
    "Diagnostic",
    "Flow",
    "KernelRule",
    "LoadedPolicy",
    "PolicyError",
    "RuleInfo",
    "WhoClass",
    "compile_policy",
    "evaluate",
    "load_policy",
]
