"""Loading: error messages carry the right file:line:column and hints; files merge as documented."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.policy import PolicyError, compile_policy, load_policy

Write = Callable[..., Path]


def _errors(path: Path | list[Path]) -> list[str]:
    with pytest.raises(PolicyError) as exc:
        load_policy(path if isinstance(path, list) else [path])
    return [str(e) for e in exc.value.errors]


def test_misspelt_direction_points_at_value_with_hint(write_policy: Write) -> None:
    path = write_policy("  rules:\n    - name: a\n      action: allow\n      direction: egres\n")
    [error] = _errors(path)
    assert error.startswith(f"{path}:8:18: invalid value 'egres' for 'direction'")
    assert "did you mean 'egress'?" in error


def test_unknown_field_points_at_key(write_policy: Write) -> None:
    path = write_policy(
        "  rules:\n    - name: a\n      action: allow\n      direction: egress\n      port: [1]\n"
    )
    [error] = _errors(path)
    assert error.startswith(f"{path}:9:7: unknown field 'port'") and "did you mean 'ports'?" in error


def test_every_bad_rule_is_reported(write_policy: Write) -> None:
    path = write_policy(
        "  rules:\n"
        "    - {name: a, action: allow, direction: egress, to: [10.0.0.1/8]}\n"
        "    - {name: b, action: allow, direction: egress, ports: ['90-80']}\n"
        "    - {name: c, action: allow, direction: listen, to: [10.0.0.1]}\n"
        "    - {name: d, action: permit, direction: egress}\n"
    )
    errors = _errors(path)
    assert any(e.startswith(f"{path}:6:56:") and "host bits" in e for e in errors)
    assert any(e.startswith(f"{path}:7:59:") and "reversed" in e for e in errors)
    assert any(e.startswith(f"{path}:8:51:") and "expected 'bind'" in e for e in errors)
    assert any(e.startswith(f"{path}:9:25:") and "'permit'" in e for e in errors)


def test_unknown_port_name_suggests_close_name(write_policy: Write) -> None:
    path = write_policy("  rules:\n    - {name: a, action: allow, direction: egress, ports: [htps]}\n")
    assert "did you mean 'https'?" in _errors(path)[0]


def test_yaml_syntax_error_has_position(write_policy: Write) -> None:
    path = write_policy("  rules: [\n")
    [error] = _errors(path)
    assert error.startswith(f"{path}:") and "invalid YAML" in error


def test_duplicate_rule_names_across_files(write_policy: Write) -> None:
    first = write_policy("  rules:\n    - {name: a, action: allow, direction: egress}\n", "a.yaml")
    second = write_policy("  rules:\n    - {name: a, action: deny, direction: egress}\n", "b.yaml")
    [error] = _errors([first, second])
    assert error.startswith(f"{second}:6:14: duplicate rule name 'a', first used at {first}:6")


def test_directory_merges_in_name_order(write_policy: Write, tmp_path: Path) -> None:
    write_policy("  rules:\n    - {name: second, action: allow, direction: egress}\n", "20-b.yaml")
    write_policy("  rules:\n    - {name: first, action: allow, direction: egress}\n", "10-a.yaml")
    compiled = compile_policy(load_policy([tmp_path]))
    assert [compiled.rules[i].name for i in sorted(compiled.rules)] == ["first", "second"]


def test_conflicting_defaults_are_an_error(write_policy: Write) -> None:
    first = write_policy("  defaults: {prevent: deny}\n", "a.yaml")
    second = write_policy("  defaults: {prevent: {egress: alert}}\n", "b.yaml")
    [error] = _errors([first, second])
    assert error.startswith(f"{second}:5:32:") and f"'deny' at {first}:5" in error


def test_repeated_identical_defaults_and_builtin_fill(write_policy: Write) -> None:
    first = write_policy("  defaults: {prevent: {egress: alert}}\n", "a.yaml")
    second = write_policy("  defaults: {prevent: {egress: alert}, detect: allow}\n", "b.yaml")
    compiled = compile_policy(load_policy([first, second]))
    assert compiled.defaults["prevent"] == {
        "egress": "alert",
        "ingress": "deny",
        "listen": "deny",
        "raw": "deny",
    }
    assert compiled.defaults["detect"] == {d: "allow" for d in ("egress", "ingress", "listen", "raw")}


def test_missing_file_is_reported(tmp_path: Path) -> None:
    assert "no such file" in _errors(tmp_path / "absent.yaml")[0]


def test_dns_names_warn_not_enforced(write_policy: Write) -> None:
    path = write_policy(
        "  rules:\n    - {name: a, action: allow, direction: egress, to: ['*.example.com']}\n"
    )
    compiled = compile_policy(load_policy([path]))
    assert compiled.entries == [] and "not enforced until DNS awareness" in compiled.warnings[0]


def test_unknown_user_warns_and_matches_nobody(write_policy: Write) -> None:
    path = write_policy(
        "  rules:\n    - {name: a, action: allow, direction: egress, who: {user: [no-such-user-xyz]}}\n"
    )
    compiled = compile_policy(load_policy([path]))
    assert compiled.who_classes[0].uid == [] and "does not exist" in compiled.warnings[0]


def test_too_many_who_classes_is_an_error(write_policy: Write) -> None:
    rules = "".join(
        f"    - {{name: r{i}, action: allow, direction: egress, who: {{uid: [{i}]}}}}\n" for i in range(65)
    )
    rules = rules.replace("uid:", "user:")
    path = write_policy("  rules:\n" + rules)
    with pytest.raises(PolicyError, match="at most 64"):
        compile_policy(load_policy([path]))


def test_too_many_rules_on_one_network_is_an_error(write_policy: Write) -> None:
    rules = "".join(
        f"    - {{name: r{i}, action: allow, direction: egress, to: [10.0.0.0/8], ports: [{i + 1}]}}\n"
        for i in range(65)
    )
    path = write_policy("  rules:\n" + rules)
    with pytest.raises(PolicyError, match="at most 64 rules per"):
        compile_policy(load_policy([path]))


def test_rule_info_names_each_rule_and_its_line_in_every_file(write_policy: Write) -> None:
    """Rule ids run on across files; each rule's info (made on demand) points at the rule's own line."""
    first = write_policy(
        "  rules:\n    - {name: a, action: allow, direction: egress}\n\n"
        "    - name: b\n      action: deny\n      direction: egress\n      to: [10.0.0.0/8, db.internal]\n",
        "a.yaml",
    )
    second = write_policy("  rules:\n    - {name: c, action: deny, audit: true, direction: raw}\n", "b.yaml")
    compiled = compile_policy(load_policy([first, second]))
    assert len(compiled.rules) == 3 and list(compiled.rules) == [1, 2, 3] and 4 not in compiled.rules
    info = {rid: compiled.rules[rid] for rid in compiled.rules}
    assert [(i.name, i.source, i.action) for i in info.values()] == [
        ("a", f"{first}:6", "allow"),
        ("b", f"{first}:8", "deny"),
        ("c", f"{second}:6", "deny-audit"),
    ]
    assert info[2].dns_names == ["db.internal"] and info[1].dns_names == []
    assert info[2].explanation == "forbid any process to connect to 10.0.0.0/8, db.internal any port"
    assert compiled.rules[2] is info[2]  # made once
    with pytest.raises(KeyError):
        compiled.rules[0]


def test_every_rule_naming_an_unknown_user_is_warned_about(write_policy: Write) -> None:
    """Rules share one who-class, and each is named in its own warning."""
    path = write_policy(
        "  rules:\n"
        "    - {name: a, action: allow, direction: egress, who: {user: [no-such-user-xyz]}}\n"
        "    - {name: b, action: allow, direction: egress, who: {user: [no-such-user-xyz]}}\n"
    )
    compiled = compile_policy(load_policy([path]))
    assert len(compiled.who_classes) == 1
    assert [w.split(": rule ")[1][:3] for w in compiled.warnings] == ["'a'", "'b'"]


def test_json_policy_problems_point_into_the_rule(tmp_path: Path) -> None:
    """A JSON file loads on the fast path; a problem inside a rule still gets its line and column."""
    path = tmp_path / "p.json"
    path.write_text(
        '{"apiVersion": "tool/v1", "kind": "Policy", "metadata": {"name": "j"},\n'
        ' "spec": {"rules": [\n'
        '   {"name": "a", "action": "allow", "direction": "egress"},\n'
        '   {"name": "b", "action": "allow", "direction": "egres"}]}}\n'
    )
    [error] = _errors(path)
    assert error.startswith(f"{path}:4:50: invalid value 'egres' for 'direction'")


def test_json_repeated_key_is_a_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('{"apiVersion": "tool/v1", "kind": "Policy", "kind": "Policy"}\n')
    [error] = _errors(path)
    assert error == f"{path}:1:45: duplicate key 'kind'"


def test_control_character_is_reported_at_its_place(write_policy: Write) -> None:
    """A stray control character gets file:line:col and what to do, not a PyYAML traceback."""
    path = write_policy("  rules:\n    - name: a\x01b\n      action: allow\n      direction: egress\n")
    [error] = _errors(path)
    assert error.startswith(f"{path}:6:14: character U+0001 is not allowed")


def test_control_character_in_json_is_reported_at_its_place(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('{"apiVersion": "tool/v1",\n "kind": "Pol\x07icy"}\n')
    [error] = _errors(path)
    assert error.startswith(f"{path}:2:14: character U+0007 is not allowed")


def test_non_utf8_byte_is_reported_at_its_place(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(b"apiVersion: tool/v1\nkind: Pol\xe9cy\n")
    [error] = _errors(path)
    assert error == f"{path}:2:10: byte 0xe9 is not UTF-8 text (policies are UTF-8)"


def test_non_utf8_column_counts_characters(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes("kind: Pölicy ".encode() + b"\xff\n")  # 'ö' is two bytes, one character
    [error] = _errors(path)
    assert error.startswith(f"{path}:1:14: byte 0xff")
