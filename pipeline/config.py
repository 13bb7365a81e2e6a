"""Agent configuration: built-in defaults < config file (YAML) < environment (TOOL_*) < command-line flags.

Zero configuration works: detect mode, the embedded NATS server, the shipped
default policy, the whole host.
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from loaders import native
from pipeline.policy.yamlpos import PositionMap, YamlSyntaxError, load_documents


class AnomalyConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The anomaly scorer and what the enforcement stage does with its scores."""

    threshold: float = msgspec.field(default=0.9)
    # none: only flag; block-destination: in prevent mode, deny that destination for that executable.
    action: Literal["none", "block-destination"] = "none"
    warmup_observations: int = 20


class AuditConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Audit log rotation and content."""

    max_bytes: int = 50 * 1024 * 1024
    max_age_s: float = 86400.0
    keep: int = 10
    process_events: bool = False


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Everything the agent can be told. See docs/configuration.md."""

    mode: Literal["detect", "prevent"] = "detect"
    nats: str | None = None  # URL of an existing server or cluster; None: start the embedded one
    nats_port: int = 4222  # embedded server's client port on loopback (0: any free port)
    nats_credentials: str | None = None  # file with the agent's URL incl. user:password, for --nats
    policy: list[str] = []  # files or directories; empty: the shipped default policy
    cgroup: str | None = None  # attach point; None: the root of the cgroup v2 hierarchy (whole host)
    state_dir: str = "/var/lib/tool"
    audit_log: str | None = "/var/log/tool/audit.log"  # None or "": no audit log
    hostname: str | None = None
    ringbuf_bytes: int = 8 * 1024 * 1024
    flow_interval_ms: int = 1000
    # The JetStream stream that keeps events for consumers that were down: on disk, in memory
    # (faster, lost with the server), or none (live subscribers only).
    event_stream: Literal["file", "memory", "none"] = "file"
    # How a file stream writes: default (written before it is acknowledged, survives nats-server
    # being killed) or async (batched in memory, acknowledged before it reaches the file: less
    # server CPU, and the last events acknowledged are lost if nats-server is killed).
    event_stream_persist: Literal["default", "async"] = "default"
    loss_report_interval_s: float = 10.0
    watch_policy: bool = True  # reload when a policy file changes
    anomaly: AnomalyConfig = AnomalyConfig()
    audit: AuditConfig = AuditConfig()
    opentelemetry: dict[str, Any] | None = None  # see docs/opentelemetry.md; None: only OTEL_* variables
    otel_enabled: bool = False  # also enabled when OTEL_EXPORTER_OTLP_ENDPOINT is set
    bench_producer_tgid: int = 0  # benchmarks only: a process whose getppid() calls emit synthetic events
    bench_producer_burst: int = 256


class ConfigError(Exception):
    """A configuration value is wrong; the message says where (file:line:column, variable or flag)."""


ENV_PREFIX = "TOOL_"
# Environment variables: name -> config field. Lists are separated with ':'.
ENV_FIELDS = {
    "TOOL_MODE": "mode",
    "TOOL_NATS": "nats",
    "TOOL_NATS_PORT": "nats_port",
    "TOOL_NATS_CREDENTIALS": "nats_credentials",
    "TOOL_POLICY": "policy",
    "TOOL_CGROUP": "cgroup",
    "TOOL_STATE_DIR": "state_dir",
    "TOOL_AUDIT_LOG": "audit_log",
    "TOOL_HOSTNAME": "hostname",
    "TOOL_FLOW_INTERVAL_MS": "flow_interval_ms",
    "TOOL_EVENT_STREAM": "event_stream",
    "TOOL_EVENT_STREAM_PERSIST": "event_stream_persist",
}
DEFAULT_CONFIG_PATH = "/etc/tool/config.yaml"

_MSGSPEC_ERR = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")


def _path_of(text: str) -> tuple[str | int, ...]:
    out: list[str | int] = []
    for name, index in re.findall(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]", text):
        out.append(int(index) if index else name)
    return tuple(out)


def _where(source: str, positions: PositionMap | None, exc: msgspec.ValidationError) -> str:
    m = _MSGSPEC_ERR.match(str(exc))
    assert m is not None
    msg = m.group("msg").replace("`", "'")
    path = _path_of(m.group("path") or "")
    choices = _choices_at(path)
    if choices:
        msg += ", expected one of: " + ", ".join(choices)
        if "got 'bool'" in msg:
            msg += " (YAML reads on/off/yes/no as true/false: quote the value)"
    if positions is None:
        variables = [var for var, field in ENV_FIELDS.items() if (field,) == path]
        if source.startswith("environment") and variables:
            source = f"environment variable {variables[0]}"
        return f"{source}: {msg}" + (f" (at {'.'.join(map(str, path))})" if path else "")
    unknown = re.match(r"Object contains unknown field '(.*)'", msg)
    pos = positions.of_key((*path, unknown.group(1))) if unknown else positions.of_value(path)
    if unknown:
        msg += ", expected one of: " + ", ".join(_fields_at(path))
    return f"{source}:{pos.line}:{pos.column}: {msg}"


def _choices_at(path: tuple[str | int, ...]) -> list[str]:
    """The allowed values of the setting at ``path``, when its type is a set of names."""
    cls: Any = Config
    for part in path:
        if not (isinstance(part, str) and hasattr(cls, "__struct_fields__")):
            return []
        cls = {f.name: f.type for f in msgspec.structs.fields(cls)}.get(part)
    if typing.get_origin(cls) is typing.Literal:
        return [str(v) for v in typing.get_args(cls)]
    return []


def _fields_at(path: tuple[str | int, ...]) -> list[str]:
    cls: Any = Config
    for part in path:
        if isinstance(part, str) and hasattr(cls, "__struct_fields__"):
            ann = {f.name: f.type for f in msgspec.structs.fields(cls)}
            cls = ann.get(part)
    return list(getattr(cls, "__struct_fields__", ()))


def read_config_file(path: str) -> tuple[dict[str, Any], PositionMap | None]:
    """Read a YAML config file into a plain mapping, keeping positions for error messages."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    try:
        docs = load_documents(text)
    except YamlSyntaxError as exc:
        raise ConfigError(f"{path}:{exc.position.line}:{exc.position.column}: {exc.message}") from None
    if not docs:
        return {}, None
    if len(docs) > 1:
        raise ConfigError(f"{path}: expected one YAML document, found {len(docs)}")
    value, positions = docs[0]
    if not isinstance(value, dict):
        raise ConfigError(f"{path}:1:1: the config file must be a mapping of settings")
    return value, positions


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    try:  # not a setting of the agent's, but read at every policy swap: refuse a bad value at start
        native.use_native(environ.get("TOOL_NATIVE"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    out: dict[str, Any] = {}
    for var, name in ENV_FIELDS.items():
        if var not in environ:
            continue
        raw = environ[var]
        if name == "policy":
            out[name] = [p for p in raw.split(":") if p]
        elif name in ("nats_port", "flow_interval_ms"):
            try:
                out[name] = int(raw)
            except ValueError:
                raise ConfigError(f"environment variable {var}={raw!r}: expected a whole number") from None
        else:
            out[name] = raw
    return out


def load_config(
    config_path: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Merge the layers into one validated Config.

    Args:
        config_path: YAML file (default: $TOOL_CONFIG, else /etc/tool/config.yaml when it exists).
        environ: environment (default: os.environ).
        overrides: values from command-line flags (None values are ignored).

    Returns:
        The configuration.

    Raises:
        ConfigError: what is wrong and where.
    """
    env = os.environ if environ is None else environ
    path = config_path or env.get("TOOL_CONFIG")
    if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    merged: dict[str, Any] = {}
    # Where each top-level setting was given, for an error about two settings that disagree.
    origins: dict[str, str] = {}
    if path:
        file_values, positions = read_config_file(path)
        try:
            msgspec.convert(file_values, Config)
        except msgspec.ValidationError as exc:
            raise ConfigError(_where(path, positions, exc)) from None
        merged.update(file_values)
        for key in file_values:
            pos = positions.of_value((key,)) if positions else None
            origins[key] = f"{path}:{pos.line}:{pos.column}" if pos else path
    env_values = _env_values(env)
    try:
        msgspec.convert({**merged, **env_values}, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_where("environment (TOOL_*)", None, exc)) from None
    merged.update(env_values)
    origins.update({name: f"environment variable {var}" for var, name in ENV_FIELDS.items() if name in env_values})
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    merged.update(flags)
    origins.update(dict.fromkeys(flags, "command line"))
    try:
        config = msgspec.convert(merged, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_where("command line", None, exc)) from None
    _check(config, origins)
    return config


def _check(c: Config, origins: Mapping[str, str]) -> None:
    if c.event_stream_persist == "async" and c.event_stream != "file":
        # JetStream refuses async persistence on memory storage; with none there is no stream.
        # Neither is the default here, so both were given somewhere.
        raise ConfigError(
            f"{origins['event_stream_persist']}: event_stream_persist: async needs event_stream: file, but"
            f" event_stream is {c.event_stream!r} ({origins['event_stream']}): set event_stream to file,"
            " or event_stream_persist to default"
        )
    if c.ringbuf_bytes < 4096 or c.ringbuf_bytes & (c.ringbuf_bytes - 1):
        raise ConfigError(f"ringbuf_bytes: {c.ringbuf_bytes} must be a power of two of at least 4096")
    if not 0 <= c.nats_port <= 65535:
        raise ConfigError(f"nats_port: {c.nats_port} is not a port number (0-65535)")
    if c.flow_interval_ms < 0:
        raise ConfigError("flow_interval_ms: must be 0 or more")
    if not 0.0 < c.anomaly.threshold <= 1.0:
        raise ConfigError(f"anomaly.threshold: {c.anomaly.threshold} must be in (0, 1]")
    if c.loss_report_interval_s <= 0:
        raise ConfigError("loss_report_interval_s: must be more than 0")
