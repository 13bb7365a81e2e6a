"""Configuration layers and their error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config


def test_zero_configuration_is_detect_mode_with_embedded_nats(tmp_path: Path) -> None:
    c = load_config(None, environ={})
    assert c.mode == "detect" and c.nats is None and c.policy == [] and c.cgroup is None


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("mode: prevent\nstate_dir: /srv/file\nnats_port: 4000\n")
    env = {"TOOL_STATE_DIR": "/srv/env", "TOOL_NATS_PORT": "5000"}
    c = load_config(str(cfg), environ=env, overrides={"nats_port": 6000, "mode": None})
    assert c.mode == "prevent"  # file (flag given as None is ignored)
    assert c.state_dir == "/srv/env"  # environment over file
    assert c.nats_port == 6000  # flag over environment


def test_policy_list_from_environment_is_colon_separated() -> None:
    c = load_config(None, environ={"TOOL_POLICY": "/etc/a.yaml:/etc/b.d"})
    assert c.policy == ["/etc/a.yaml", "/etc/b.d"]


def test_unknown_key_in_file_names_line_column_and_choices(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("mode: detect\n\nringbuf: 4096\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(cfg), environ={})
    msg = str(e.value)
    assert msg.startswith(f"{cfg}:3:1:")
    assert "ringbuf" in msg and "ringbuf_bytes" in msg


def test_wrong_type_in_nested_section_points_at_the_value(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("anomaly:\n  threshold: high\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(cfg), environ={})
    assert str(e.value).startswith(f"{cfg}:2:14:")


def test_bad_mode_flag_and_bad_environment_number_are_refused() -> None:
    with pytest.raises(ConfigError, match="command line"):
        load_config(None, environ={}, overrides={"mode": "block"})
    with pytest.raises(ConfigError, match="TOOL_NATS_PORT"):
        load_config(None, environ={"TOOL_NATS_PORT": "abc"})


def test_semantic_limits(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ringbuf_bytes: 5000\n")
    with pytest.raises(ConfigError, match="power of two"):
        load_config(str(cfg), environ={})
    cfg.write_text("anomaly: {threshold: 1.5}\n")
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        load_config(str(cfg), environ={})


def test_yaml_syntax_error_has_position(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mode: [detect\n")
    with pytest.raises(ConfigError, match=rf"^{cfg}:\d+:\d+: invalid YAML"):
        load_config(str(cfg), environ={})


def test_event_stream_choices_and_their_errors(tmp_path: Path) -> None:
    assert load_config(None, environ={"TOOL_EVENT_STREAM": "memory"}).event_stream == "memory"
    cfg = tmp_path / "config.yaml"
    cfg.write_text("event_stream: off\n")  # YAML reads `off` as false: say where, and what is expected
    with pytest.raises(ConfigError) as e:
        load_config(str(cfg), environ={})
    assert str(e.value).startswith(f"{cfg}:1:15:") and "file" in str(e.value) and "none" in str(e.value)
    with pytest.raises(ConfigError, match="TOOL_EVENT_STREAM"):
        load_config(None, environ={"TOOL_EVENT_STREAM": "disk"})


def test_event_stream_persist_is_default_unless_asked_and_refuses_other_values(tmp_path: Path) -> None:
    assert load_config(None, environ={}).event_stream_persist == "default"
    assert load_config(None, environ={"TOOL_EVENT_STREAM_PERSIST": "async"}).event_stream_persist == "async"
    with pytest.raises(ConfigError, match=r"TOOL_EVENT_STREAM_PERSIST: .*'sync', expected one of: default, async"):
        load_config(None, environ={"TOOL_EVENT_STREAM_PERSIST": "sync"})
    cfg = tmp_path / "config.yaml"
    cfg.write_text("mode: detect\nevent_stream_persist: fast\n")
    with pytest.raises(ConfigError, match=rf"^{cfg}:2:23: .*'fast', expected one of: default, async"):
        load_config(str(cfg), environ={})


def test_async_persistence_with_a_memory_stream_or_none_names_both_settings_and_where(tmp_path: Path) -> None:
    """JetStream has async persistence for file streams only: the error says which two settings disagree."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text("event_stream: memory\nevent_stream_persist: async\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(cfg), environ={})
    assert str(e.value).startswith(f"{cfg}:2:23: event_stream_persist: async needs event_stream: file")
    assert f"event_stream is 'memory' ({cfg}:1:15)" in str(e.value)
    with pytest.raises(ConfigError, match=r"event_stream is 'none' \(environment variable TOOL_EVENT_STREAM\)"):
        load_config(None, environ={"TOOL_EVENT_STREAM": "none", "TOOL_EVENT_STREAM_PERSIST": "async"})
    cfg.write_text("event_stream_persist: async\n")
    with pytest.raises(ConfigError, match=r"event_stream is 'memory' \(command line\)"):
        load_config(str(cfg), environ={}, overrides={"event_stream": "memory"})
    assert load_config(str(cfg), environ={"TOOL_EVENT_STREAM": "file"}).event_stream_persist == "async"


def test_tool_native_takes_0_or_1_and_refuses_anything_else() -> None:
    """TOOL_NATIVE is read at every policy swap: a value that means nothing is refused at start, not ignored."""
    for value in ("0", "1"):
        assert load_config(None, environ={"TOOL_NATIVE": value}).mode == "detect"
    for value in ("off", "false", ""):
        with pytest.raises(ConfigError, match=rf"TOOL_NATIVE='{value}': expected 0 .* or 1"):
            load_config(None, environ={"TOOL_NATIVE": value})
