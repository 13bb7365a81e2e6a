"""Python mirror of bpf/include/tool_abi.h: constants and precompiled struct layouts.

Each layout is a list of (field, struct-format) pairs so that tests/test_abi.py
can check every field's offset and size against the BTF of the compiled
object: the two sides cannot drift silently.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ABI_VERSION = 1

# enum tool_event_kind
EV_CONNECT, EV_SENDMSG, EV_INBOUND, EV_ACCEPT, EV_BIND, EV_SOCKET, EV_EXEC, EV_EXIT = range(1, 9)
# enum tool_direction
DIR_EGRESS, DIR_INGRESS, DIR_LISTEN, DIR_RAW = range(1, 5)
DIR_MAX = 4
# enum tool_verdict
VERDICT_ALLOW, VERDICT_BLOCK, VERDICT_WOULD_BLOCK, VERDICT_ALERT = range(1, 5)
# enum tool_action
ACT_NONE, ACT_ALLOW, ACT_ALERT, ACT_DENY_AUDIT, ACT_DENY = range(0, 5)
# enum tool_mode
MODE_DETECT, MODE_PREVENT = 1, 2

F_UNKNOWN = 1 << 0
F_V4 = 1 << 1
F_NO_TASK = 1 << 2
F_PACKET = 1 << 3
F_KILLED = 1 << 4
F_TRUNCATED = 1 << 5

# enum tool_config_index
CFG_MODE, CFG_ACTIVE_SLOT, CFG_FLOW_INTERVAL_MS = 0, 1, 2
CFG_MAX = 8

# enum tool_counter
COUNTERS = (
    "events",
    "folded",
    "ring_buffer_full",
    "allowed",
    "blocked",
    "would_block",
    "unknown",
    "task_miss",
    "ring_buffer_avail_bytes",  # a gauge (per CPU: take the largest), not a counter
)
CNT_MAX = 16

# enum tool_subject_dim
DIM_EXE, DIM_UID, DIM_GID, DIM_CGROUP, DIM_COMM = range(5)
DIMS = ("exe", "uid", "gid", "cgroup", "comm")

COMM_LEN = 16
FILENAME_LEN = 256
ARGS_LEN = 256
LPM_KEY_BITS = 32
MAX_NODE_RULES = 64
MAX_NESTING = 16
SLOT_RULES = 524288  # rules array entries per slot
SLOT_NODES = 524288  # LPM nodes per slot: max_entries of each slot's trie

DIRECTIONS = {"egress": DIR_EGRESS, "ingress": DIR_INGRESS, "listen": DIR_LISTEN, "raw": DIR_RAW}
ACTIONS = {"allow": ACT_ALLOW, "alert": ACT_ALERT, "deny-audit": ACT_DENY_AUDIT, "deny": ACT_DENY}


@dataclass(frozen=True)
class Layout:
    """A C struct as a list of named fields with struct-module formats (little endian, no implicit padding)."""

    c_name: str
    fields: tuple[tuple[str, str], ...]

    @property
    def fmt(self) -> str:
        return "<" + "".join(f for _, f in self.fields)

    @property
    def size(self) -> int:
        return struct.calcsize(self.fmt)

    def offsets(self) -> dict[str, tuple[int, int]]:
        """Field name -> (offset, size), skipping padding fields (names starting with '_')."""
        out: dict[str, tuple[int, int]] = {}
        off = 0
        for name, f in self.fields:
            size = struct.calcsize("<" + f)
            if not name.startswith("_"):
                out[name] = (off, size)
            off += size
        return out

    def compile(self) -> struct.Struct:
        return struct.Struct(self.fmt)


HEADER = Layout(
    "tool_event_header",
    (("kind", "H"), ("size", "H"), ("flags", "I"), ("ts_ns", "Q"), ("seq", "Q"), ("cpu", "I"), ("abi", "I")),
)
TASK = Layout(
    "tool_task",
    (
        ("pid", "I"),
        ("tgid", "I"),
        ("ppid", "I"),
        ("uid", "I"),
        ("gid", "I"),
        ("_pad0", "I"),
        ("exec_id", "Q"),
        ("cgroup_id", "Q"),
        ("comm", "16s"),
    ),
)
CONN_EVENT = Layout(
    "tool_conn_event",
    (
        ("hdr", "32s"),
        ("task", "56s"),
        ("netns_cookie", "Q"),
        ("sock_cookie", "Q"),
        ("family", "H"),
        ("protocol", "B"),
        ("direction", "B"),
        ("verdict", "B"),
        ("mode", "B"),
        ("action", "B"),
        ("sock_type", "B"),
        ("rule_id", "I"),
        ("policy_gen", "I"),
        ("local_addr", "16s"),
        ("remote_addr", "16s"),
        ("local_port", "H"),
        ("remote_port", "H"),
        ("repeat", "I"),
    ),
)
EXEC_EVENT = Layout(
    "tool_exec_event",
    (
        ("hdr", "32s"),
        ("task", "56s"),
        ("exe_ino", "Q"),
        ("exe_dev", "I"),
        ("exit_code", "I"),
        ("filename_len", "H"),
        ("args_len", "H"),
        ("_pad0", "I"),
        ("filename", "256s"),
        ("args", "256s"),
    ),
)
TASK_INFO = Layout("tool_task_info", (("exec_id", "Q"), ("exe_ino", "Q"), ("exe_dev", "I"), ("ppid", "I")))
SLOT_CFG = Layout(
    "tool_slot_cfg",
    (("wildcard", "5Q"), ("generation", "I"), ("default_action", "8s"), ("dims_used", "I")),
)
EXE_KEY = Layout("tool_exe_key", (("slot", "I"), ("dev", "I"), ("ino", "Q")))
ID_KEY = Layout("tool_id_key", (("slot", "I"), ("id", "I")))
CGROUP_KEY = Layout("tool_cgroup_key", (("slot", "I"), ("_pad0", "I"), ("cgroup_id", "Q")))
COMM_KEY = Layout("tool_comm_key", (("slot", "I"), ("comm", "16s")))
LPM_KEY = Layout(
    "tool_lpm_key",
    (
        ("prefixlen", "I"),
        ("slot", "B"),
        ("direction", "B"),
        ("protocol", "B"),
        ("_pad0", "B"),
        ("addr", "16s"),
    ),
)
LPM_VALUE = Layout("tool_lpm_value", (("first", "I"), ("count", "H"), ("parent_len", "H")))
RULE = Layout(
    "tool_rule",
    (
        ("who", "Q"),
        ("port_lo", "H"),
        ("port_hi", "H"),
        ("action", "B"),
        ("_pad0", "3s"),
        ("rule_id", "I"),
        ("_pad1", "I"),
    ),
)
FLOW_KEY = Layout(
    "tool_flow_key",
    (
        ("tgid", "I"),
        ("direction", "B"),
        ("protocol", "B"),
        ("port", "H"),
        ("addr", "16s"),
        ("exec_id", "Q"),
        ("exe_ino", "Q"),
        ("exe_dev", "I"),
        ("uid", "I"),
        ("gid", "I"),
        ("clock", "I"),
        ("cgroup_id", "Q"),
        ("comm", "16s"),
    ),
)
FLOW_VALUE = Layout(
    "tool_flow_value",
    (
        ("last_emit_ns", "Q"),
        ("repeat", "I"),
        ("decision", "I"),
        ("generation", "I"),
        ("flags", "I"),
        ("walk", "Q"),
    ),
)
LISTENER_KEY = Layout(
    "tool_listener_key",
    (("cookie", "Q"), ("port", "H"), ("protocol", "B"), ("by_port", "B"), ("_pad0", "I")),
)
LISTENER = Layout("tool_listener", (("task", "56s"), ("exe_ino", "Q"), ("exe_dev", "I"), ("_pad0", "I")))

ALL_LAYOUTS = (
    HEADER,
    TASK,
    CONN_EVENT,
    EXEC_EVENT,
    TASK_INFO,
    SLOT_CFG,
    EXE_KEY,
    ID_KEY,
    CGROUP_KEY,
    COMM_KEY,
    LPM_KEY,
    LPM_VALUE,
    RULE,
    FLOW_KEY,
    FLOW_VALUE,
    LISTENER_KEY,
    LISTENER,
)

# Flat decoders for the two ring-buffer records: header + task + body in one unpack.
CONN_RECORD = struct.Struct("<HHIQQII" + "IIIIIIQQ16s" + "QQHBBBBBBII16s16sHHI")
EXEC_RECORD = struct.Struct("<HHIQQII" + "IIIIIIQQ16s" + "QIIHHI256s256s")
assert CONN_RECORD.size == CONN_EVENT.size and EXEC_RECORD.size == EXEC_EVENT.size


def kernel_dev(st_dev: int) -> int:
    """Convert a user-space st_dev to the kernel's internal dev_t (major << 20 | minor)."""
    import os

    return (os.major(st_dev) << 20) | os.minor(st_dev)
