"""Load policy files (YAML, JSON or CUE) into checked :class:`Policy` documents with source positions.

Every problem is reported as a :class:`Diagnostic` with ``file:line:column`` and, where we can
guess it, a hint. Loading collects as many problems as it can before raising :class:`PolicyError`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

import msgspec

from pipeline.policy import cue as cue_cli
from pipeline.policy.addresses import ParsedAddress, parse_address
from pipeline.policy.diagnostics import Diagnostic, PolicyError, did_you_mean
from pipeline.policy.model import (
    ADDRESS_PATTERN,
    AGENT_MODES,
    CGROUP_PATTERN,
    COMM_PATTERN,
    DIRECTIONS,
    EXE_PATTERN,
    NAME_PATTERN,
    PORT_STRING_PATTERN,
    PRINCIPAL_PATTERN,
    Defaults,
    DirectionDefaults,
    Metadata,
    Policy,
    Rule,
    Spec,
    Who,
)
from pipeline.policy.ports import parse_port
from pipeline.policy.yamlpos import Path, PositionMap, YamlSyntaxError, load_documents, paused_gc

POLICY_SUFFIXES = (".yaml", ".yml", ".json", ".cue")

# Which address field each direction uses; raw rules take none (and no ports or protocol).
ADDRESS_FIELD = {"egress": "to", "ingress": "from", "listen": "bind"}
_ENUM_FIELDS: dict[str, Sequence[str]] = {
    "direction": DIRECTIONS,
    "action": ("allow", "deny", "alert"),
    "protocol": ("tcp", "udp", "any"),
    "mode": ("enforce", "audit"),
    "detect": ("allow", "alert", "deny"),
    "prevent": ("allow", "alert", "deny"),
    "egress": ("allow", "alert", "deny"),
    "ingress": ("allow", "alert", "deny"),
    "listen": ("allow", "alert", "deny"),
    "raw": ("allow", "alert", "deny"),
    "apiVersion": ("tool/v1",),
    "kind": ("Policy",),
}
_PATTERN_MEANING = {
    NAME_PATTERN: "a name of letters, digits, '.', '_' or '-' (at most 63), starting with a letter or digit",
    PORT_STRING_PATTERN: "a port number, a range like '8000-8080' or a service name like 'https'",
    ADDRESS_PATTERN: "an IP address, a CIDR like '10.0.0.0/8', 'any' or a DNS name like '*.example.com'",
    EXE_PATTERN: "an absolute path like '/usr/sbin/nginx'",
    CGROUP_PATTERN: "a cgroup path from the root, like '/system.slice/nginx.service'",
    COMM_PATTERN: (
        "a process name without '*' or '?', like 'nginx': the kernel compares names exactly; "
        "for a pattern, use an 'exe' glob such as '/usr/bin/python3*'"
    ),
    PRINCIPAL_PATTERN: "a user or group name, or a numeric id",
    "^[0-9a-f]{6,64}$": "a container id (6 to 64 lower-case hex digits)",
}
_MSGSPEC_ERROR = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


@dataclass(frozen=True, slots=True)
class SourcedDocument:
    """One checked policy document and where it came from."""

    file: str
    policy: Policy
    positions: PositionMap
    addresses: list[tuple[ParsedAddress, ...]] = field(default_factory=list)
    """Each rule's addresses (its ``to``, ``from`` or ``bind``, by direction; none for raw rules), parsed.

    Checking the rules parses them, and the compiler takes them from here: looking each up again in
    the parser's cache cost about a third of compiling a 100k-rule policy. A document made
    elsewhere may leave it empty: the compiler then parses the addresses itself (:func:`rule_addresses`).
    """

    def where(self, path: Path) -> str:
        """Return ``file:line`` for the value at ``path`` (``file`` alone when positions are unknown)."""
        pos = self.positions.of_value(path)
        return f"{self.file}:{pos.line}" if pos.line else self.file


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    """All documents of a policy, in merge order, plus the defaults they set and any warnings."""

    documents: list[SourcedDocument]
    defaults: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)
    """mode -> direction -> (action, 'file:line' that set it); only explicitly set cells."""
    warnings: list[Diagnostic] = field(default_factory=list)

    @property
    def sources(self) -> list[str]:
        """The files loaded, in merge order (a file appears once even with several documents)."""
        return list(dict.fromkeys(doc.file for doc in self.documents))


def _struct_at(path: Path) -> type[msgspec.Struct] | None:
    names = [p for p in path if isinstance(p, str)]
    if not path:
        return Policy
    last = path[-1]
    if isinstance(last, int) and names[-1:] == ["rules"]:
        return Rule
    table: dict[str, type[msgspec.Struct]] = {
        "metadata": Metadata,
        "spec": Spec,
        "defaults": Defaults,
        "detect": DirectionDefaults,
        "prevent": DirectionDefaults,
        "who": Who,
    }
    return table.get(str(last))


def _field_names(cls: type[msgspec.Struct]) -> list[str]:
    return [f.encode_name for f in msgspec.structs.fields(cls)]


def _parse_msgspec_path(text: str) -> Path:
    out: list[str | int] = []
    for name, index in re.findall(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]", text):
        out.append(int(index) if index else name)
    return tuple(out)


def _describe(path: Path) -> str:
    if len(path) >= 2 and path[-2] == "rules" and isinstance(path[-1], int):
        return f"rules[{path[-1]}]"
    strs = [p for p in path if isinstance(p, str)]
    return f"'{strs[-1]}'" if strs else "document"


def _translate(err: msgspec.ValidationError, prefix: Path, value: Any, file: str, pos: PositionMap) -> Diagnostic:
    match = _MSGSPEC_ERROR.match(str(err))
    assert match is not None
    msg = match.group("msg")
    path = (*prefix, *_parse_msgspec_path(match.group("path") or ""))
    at = pos.of_value(path)
    hint = ""
    if m := re.match(r"Object contains unknown field `(.*)`", msg):
        name = m.group(1)
        cls = _struct_at(path)
        choices = _field_names(cls) if cls else []
        at = pos.of_key((*path, name))
        where = _describe(path) if path else "the document"
        text = f"unknown field '{name}' in {where}"
        if choices:
            text += ", expected one of: " + ", ".join(choices)
        hint = did_you_mean(name, choices) if choices else ""
        if hint.startswith("expected"):
            hint = ""
        return Diagnostic(file, at.line, at.column, text, hint)
    if m := re.match(r"Object missing required field `(.*)`", msg):
        return Diagnostic(file, at.line, at.column, f"missing required field '{m.group(1)}' in {_describe(path)}")
    if m := re.match(r"Invalid enum value (.*)", msg):
        bad = m.group(1).strip("'")
        key = next((p for p in reversed(path) if isinstance(p, str)), "")
        choices = list(_ENUM_FIELDS.get(key, ()))
        text = f"invalid value '{bad}' for '{key}'"
        if choices:
            text += ", expected one of: " + ", ".join(choices)
        hint = did_you_mean(bad, choices) if choices else ""
        if hint.startswith("expected"):
            hint = ""
        return Diagnostic(file, at.line, at.column, text, hint)
    for pattern, meaning in _PATTERN_MEANING.items():
        if pattern in msg:
            got = _lookup(value, path[len(prefix) :])
            return Diagnostic(
                file, at.line, at.column, f"invalid value {got!r} for {_describe(path)}, expected {meaning}"
            )
    text = msg.replace("`", "")
    text = text[:1].lower() + text[1:]
    if "expected array" in text:
        hint = "write a list, e.g. [value] or one '- value' per line"
    if "<=" in text or ">=" in text:
        text = f"value {_lookup(value, path[len(prefix) :])!r} is out of range: {text}"
    return Diagnostic(file, at.line, at.column, f"{_describe(path)}: {text}", hint)


def _lookup(value: Any, path: Path) -> Any:
    for part in path:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def _convert(value: Any, cls: type[Any], prefix: Path, file: str, pos: PositionMap) -> tuple[Any, list[Diagnostic]]:
    try:
        return msgspec.convert(value, cls), []
    except msgspec.ValidationError as err:
        return None, [_translate(err, prefix, value, file, pos)]


def _check_structure(
    value: Any, file: str, pos: PositionMap
) -> tuple[Policy | None, list[Diagnostic], list[tuple[int, Rule]]]:
    """Convert one document, reporting one problem per rule plus the first one outside the rules.

    Also returns the rules that are well-formed on their own, so that their semantic checks
    run even when a sibling rule is malformed.
    """
    if not isinstance(value, dict):
        at = pos.of_value(())
        problem = Diagnostic(
            file, at.line, at.column, "expected a mapping (a policy document)", "start from `policy init`"
        )
        return None, [problem], []
    # Fast path: a valid document converts in one call; only a faulty one is converted rule by
    # rule below, to report one problem per rule with its position.
    try:
        whole = msgspec.convert(value, Policy)
    except msgspec.ValidationError:
        pass
    else:
        rules = whole.spec.rules
        return whole, [], [] if isinstance(rules, msgspec.UnsetType) else list(enumerate(rules))
    errors: list[Diagnostic] = []
    good: list[tuple[int, Rule]] = []
    spec = value.get("spec")
    raw_rules = spec.get("rules") if isinstance(spec, dict) else None
    if isinstance(spec, dict) and isinstance(raw_rules, list):
        for index, raw_rule in enumerate(raw_rules):
            rule, problems = _convert(raw_rule, Rule, ("spec", "rules", index), file, pos)
            errors += problems
            if rule is not None:
                good.append((index, rule))
        errors += _convert({**value, "spec": {**spec, "rules": []}}, Policy, (), file, pos)[1]
        if errors:
            return None, errors, good
    policy, errors = _convert(value, Policy, (), file, pos)
    if policy is not None and not isinstance(policy.spec.rules, msgspec.UnsetType):
        good = list(enumerate(policy.spec.rules))
    return policy, errors, good


def rule_addresses(rule: Rule) -> tuple[ParsedAddress, ...]:
    """A checked rule's addresses, parsed: its ``to``, ``from`` or ``bind`` by direction; none for raw."""
    wanted = ADDRESS_FIELD.get(rule.direction)
    items = {"to": rule.to, "from": rule.from_, "bind": rule.bind}.get(wanted or "", msgspec.UNSET)
    return () if isinstance(items, msgspec.UnsetType) else tuple(map(parse_address, items))


def _check_rule(
    rule: Rule, path: Path, file: str, pos: PositionMap, addresses: list[tuple[ParsedAddress, ...]]
) -> list[Diagnostic]:
    """Check what the model alone cannot; append the rule's addresses, parsed, to ``addresses``."""
    errors: list[Diagnostic] = []
    parsed: list[ParsedAddress] = []

    def err(sub: Path, message: str, hint: str = "", key: bool = False) -> None:
        at = pos.of_key((*path, *sub)) if key else pos.of_value((*path, *sub))
        errors.append(Diagnostic(file, at.line, at.column, message, hint))

    wanted = ADDRESS_FIELD.get(rule.direction)
    present = {"to": rule.to, "from": rule.from_, "bind": rule.bind}
    for name, items in present.items():
        if items is msgspec.UNSET:
            continue
        if wanted is None:
            err(
                (name,),
                f"raw rules take no '{name}': they match raw and packet sockets, which have no address",
                "remove the field",
                key=True,
            )
        elif name != wanted:
            err(
                (name,),
                f"'{name}' does not apply to {rule.direction} rules, expected '{wanted}'",
                f"{rule.direction} rules name their addresses with '{wanted}'",
                key=True,
            )
        else:
            for i, spec in enumerate(items):
                try:
                    parsed.append(parse_address(spec))
                except ValueError as exc:
                    err((name, i), str(exc))
    addresses.append(tuple(parsed))
    if rule.direction == "raw":
        for name, val in (("ports", rule.ports), ("protocol", rule.protocol)):
            if val is not msgspec.UNSET:
                err((name,), f"raw rules take no '{name}'", "remove the field", key=True)
    elif rule.ports is not msgspec.UNSET:
        for i, port in enumerate(rule.ports):
            try:
                parse_port(port)
            except ValueError as exc:
                hint = ""
                if isinstance(port, str) and not port[:1].isdigit():
                    from pipeline.policy.ports import WELL_KNOWN_PORTS

                    hint = did_you_mean(port, WELL_KNOWN_PORTS)
                    if hint.startswith("expected"):
                        hint = ""
                err(("ports", i), str(exc), hint)
    if rule.audit is True and rule.action != "deny":
        err(
            ("audit",),
            f"'audit: true' applies only to deny rules, this rule's action is '{rule.action}'",
            "remove 'audit' or use 'action: deny'",
            key=True,
        )
    return errors


def _expand(paths: Iterable[FsPath | str]) -> tuple[list[FsPath], list[Diagnostic]]:
    files: list[FsPath] = []
    errors: list[Diagnostic] = []
    for raw in paths:
        path = FsPath(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in POLICY_SUFFIXES and p.is_file())
            if not found:
                errors.append(Diagnostic(str(path), 0, 0, "directory holds no policy file (.yaml, .yml, .json, .cue)"))
            files += found
        elif path.is_file():
            files.append(path)
        else:
            errors.append(Diagnostic(str(path), 0, 0, "no such file or directory"))
    return files, errors


def _read(path: FsPath) -> tuple[list[tuple[Any, PositionMap]], list[Diagnostic]]:
    name = str(path)
    if path.suffix == ".cue":
        try:
            return [(cue_cli.export(path), PositionMap())], []
        except cue_cli.CueError as exc:
            return [], exc.diagnostics
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [], [Diagnostic(name, 0, 0, f"cannot read: {exc.strerror or exc}")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        column = len(data[line_start : exc.start].decode("utf-8", "replace")) + 1  # characters, as elsewhere
        return [], [
            Diagnostic(name, line, column, f"byte 0x{data[exc.start]:02x} is not UTF-8 text (policies are UTF-8)")
        ]
    try:
        return load_documents(text), []
    except YamlSyntaxError as exc:
        return [], [Diagnostic(name, exc.position.line, exc.position.column, exc.message)]


def _merge_defaults(docs: list[SourcedDocument], errors: list[Diagnostic]) -> dict[str, dict[str, tuple[str, str]]]:
    merged: dict[str, dict[str, tuple[str, str]]] = {mode: {} for mode in AGENT_MODES}
    for doc in docs:
        defaults = doc.policy.spec.defaults
        if isinstance(defaults, msgspec.UnsetType):
            continue
        for mode in AGENT_MODES:
            setting = getattr(defaults, mode)
            if isinstance(setting, msgspec.UnsetType):
                continue
            cells: dict[str, tuple[str, Path]]
            if isinstance(setting, str):
                cells = {d: (setting, ("spec", "defaults", mode)) for d in DIRECTIONS}
            else:
                cells = {}
                for d in DIRECTIONS:
                    value = getattr(setting, d)
                    if isinstance(value, str):
                        cells[d] = (value, ("spec", "defaults", mode, d))
            for direction, (value, path) in cells.items():
                origin = doc.where(path)
                previous = merged[mode].get(direction)
                if previous and previous[0] != value:
                    at = doc.positions.of_value(path)
                    errors.append(
                        Diagnostic(
                            doc.file,
                            at.line,
                            at.column,
                            f"default for {direction} in {mode} mode is '{value}' here but '{previous[0]}' "
                            f"at {previous[1]}; files may repeat a default only with the same value",
                            "set each default in one file (e.g. 00-defaults.yaml)",
                        )
                    )
                elif not previous:
                    merged[mode][direction] = (value, origin)
    return merged


def load_policy(paths: Sequence[FsPath | str]) -> LoadedPolicy:
    """Load and check policy files or directories (``.yaml``, ``.yml``, ``.json``, ``.cue``).

    Directories contribute their policy files sorted by name. Rules concatenate in that order.

    Args:
        paths: Files or directories, in merge order.

    Returns:
        The checked documents with their positions and merged defaults.

    Raises:
        PolicyError: Any document is malformed; lists every problem found.
    """
    with paused_gc():
        return _load(paths)


def _load(paths: Sequence[FsPath | str]) -> LoadedPolicy:
    files, errors = _expand(paths)
    if not files and not errors:
        errors.append(Diagnostic("<arguments>", 0, 0, "no policy file given"))
    docs: list[SourcedDocument] = []
    seen: dict[str, tuple[str, PositionMap, Path]] = {}  # rule name -> where it was first used
    for path in files:
        parsed, read_errors = _read(path)
        errors += read_errors
        if not parsed and not read_errors:
            errors.append(Diagnostic(str(path), 1, 1, "file holds no policy document"))
        for value, pos in parsed:
            policy, problems, good_rules = _check_structure(value, str(path), pos)
            errors += problems
            addresses: list[tuple[ParsedAddress, ...]] = []  # complete when the document has no problem
            if policy is not None:
                docs.append(SourcedDocument(str(path), policy, pos, addresses))
            for index, rule in good_rules:
                rule_path: Path = ("spec", "rules", index)
                errors += _check_rule(rule, rule_path, str(path), pos, addresses)
                if rule.name in seen:
                    # Positions inside a rule are looked up only to report a problem (see PositionMap).
                    at = pos.of_value((*rule_path, "name"))
                    first_file, first_positions, first_path = seen[rule.name]
                    first_line = first_positions.of_value((*first_path, "name")).line
                    first = f"{first_file}:{first_line}" if first_line else first_file
                    errors.append(
                        Diagnostic(
                            str(path),
                            at.line,
                            at.column,
                            f"duplicate rule name '{rule.name}', first used at {first}",
                            "rule names identify rules in alerts; give each a distinct name",
                        )
                    )
                else:
                    seen[rule.name] = (str(path), pos, rule_path)
    defaults = _merge_defaults(docs, errors)
    if errors:
        order = {str(f): i for i, f in enumerate(files)}
        raise PolicyError(sorted(errors, key=lambda e: (order.get(e.file, -1), e.line, e.column)))
    return LoadedPolicy(docs, defaults)
