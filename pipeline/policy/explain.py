"""Plain-language summary of a compiled policy: what is allowed, alerted, denied and left to defaults."""

from __future__ import annotations

from pipeline.policy.compiler import CompiledPolicy

_SECTIONS = (
    ("allow", "Allowed"),
    ("alert", "Allowed but alerted"),
    ("deny", "Denied (blocked in prevent mode, flagged as would-block in detect mode)"),
    ("deny-audit", "Denied in audit only (flagged as would-block, never blocked)"),
)
_DEFAULT_WORDS = {
    "allow": "allowed",
    "alert": "allowed and alerted",
    "deny": "denied",
}


def explain(compiled: CompiledPolicy) -> str:
    """Describe ``compiled`` in a few paragraphs of plain text."""
    lines = [f"Policy from {', '.join(compiled.sources)}: {len(compiled.rules)} rules."]
    for action, title in _SECTIONS:
        infos = [(rid, info) for rid, info in compiled.rules.items() if info.action == action]
        if not infos:
            continue
        lines += ["", f"{title}:"]
        lines += [f"  - [{info.name}] {info.explanation} ({info.source})" for _, info in infos]
    lines += [
        "",
        "When several rules match, deny wins over audit deny, which wins over alert, which wins over allow.",
        "Everything no rule matches falls to the defaults:",
    ]
    for mode, cells in compiled.defaults.items():
        words = ", ".join(f"{direction} {_DEFAULT_WORDS[value]}" for direction, value in cells.items())
        note = " (detect mode never blocks: denied means flagged as would-block)" if mode == "detect" else ""
        lines.append(f"  - in {mode} mode: {words}{note}")
    if compiled.warnings:
        lines += ["", "Warnings:"] + [f"  - {w}" for w in compiled.warnings]
    return "\n".join(lines)
