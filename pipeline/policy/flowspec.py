"""The one-line flow syntax of ``policy test``.

Example: ``egress tcp 10.0.0.5:5432 exe=/usr/sbin/nginx user=www-data``.

Grammar: ``DIRECTION [PROTOCOL] [ADDRESS[:PORT]] [key=value ...]``. IPv6 addresses go in brackets
(``[2001:db8::1]:443``). For ingress the address is the peer and the port is our local port; for
listen both are the local bound ones; raw takes neither. Keys: exe, comm, user (name or number),
uid, group (name or number), gid, cgroup (path from the cgroup2 root), unit (systemd unit,
placed under system.slice).
"""

from __future__ import annotations

import grp
import pwd

from pipeline.policy.evaluate import Flow
from pipeline.policy.model import DIRECTIONS

_KEYS = ("exe", "comm", "user", "uid", "group", "gid", "cgroup", "unit")


def _principal(value: str, kind: str) -> int:
    if value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid if kind == "user" else grp.getgrnam(value).gr_gid
    except KeyError:
        raise ValueError(f"{kind} '{value}' does not exist on this host; give a number instead") from None


def parse_flow(text: str) -> Flow:
    """Parse one flow line.

    Raises:
        ValueError: The line does not follow the grammar; the message says what was expected.
    """
    words = text.split()
    if not words or words[0] not in DIRECTIONS:
        raise ValueError(f"flow must start with a direction ({', '.join(DIRECTIONS)}): {text!r}")
    direction = words.pop(0)
    protocol = "tcp"
    if words and words[0] in ("tcp", "udp"):
        protocol = words.pop(0)
    address, port = "::", 0
    if words and "=" not in words[0]:
        target = words.pop(0)
        if target.startswith("["):
            host, _, rest = target[1:].partition("]")
            address, port_text = host, rest.lstrip(":")
        elif target.count(":") == 1:
            address, port_text = target.split(":")
        else:
            address, port_text = target, ""
        if port_text:
            if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
                raise ValueError(f"bad port {port_text!r} in {target!r}, expected 0-65535")
            port = int(port_text)
    fields: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or key not in _KEYS:
            raise ValueError(f"expected key=value with key one of {', '.join(_KEYS)}, got {word!r}")
        fields[key] = value
    uid = (
        _principal(fields.get("user") or fields["uid"], "user")
        if ("user" in fields or "uid" in fields)
        else None
    )
    gid = (
        _principal(fields.get("group") or fields["gid"], "group")
        if ("group" in fields or "gid" in fields)
        else None
    )
    cgroup = fields.get("cgroup")
    if "unit" in fields and cgroup is None:
        cgroup = f"system.slice/{fields['unit']}"
    return Flow(
        direction=direction,
        protocol=protocol,
        remote_addr=address,
        port=port,
        exe=fields.get("exe"),
        comm=fields.get("comm"),
        uid=uid,
        gid=gid,
        cgroup=cgroup.lstrip("/") if cgroup else None,
    )


def format_flow(flow: Flow) -> str:
    """Write a flow back in the one-line syntax."""
    parts = [flow.direction]
    if flow.direction != "raw":
        addr = f"[{flow.remote_addr}]" if ":" in flow.remote_addr else flow.remote_addr
        parts += [str(flow.protocol), f"{addr}:{flow.port}"]
    for key in ("exe", "comm", "uid", "gid", "cgroup"):
        value = getattr(flow, key)
        if value is not None:
            parts.append(f"{key}={value}")
    return " ".join(parts)
