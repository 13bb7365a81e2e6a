"""The policy document model: the one source of truth for YAML/JSON policies.

The JSON Schema in ``docs/policy.schema.json`` is generated from these structs
(see :mod:`pipeline.policy.schema`) and the CUE schema in ``cue/policy`` is kept
equal to it by the shared test corpus. Patterns here are deliberately written
in the regular-expression subset that ECMAScript, Python and RE2 (CUE) agree on.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

API_VERSION = "tool/v1"

Action = Literal["allow", "deny", "alert"]
DefaultAction = Literal["allow", "alert", "deny"]
Direction = Literal["egress", "ingress", "listen", "raw"]
Protocol = Literal["tcp", "udp", "any"]
PolicyMode = Literal["enforce", "audit"]

DIRECTIONS: tuple[Direction, ...] = ("egress", "ingress", "listen", "raw")
ACTIONS: tuple[Action, ...] = ("allow", "deny", "alert")
DEFAULT_ACTIONS: tuple[DefaultAction, ...] = ("allow", "alert", "deny")
PROTOCOLS: tuple[Protocol, ...] = ("tcp", "udp", "any")
AGENT_MODES: tuple[str, ...] = ("detect", "prevent")

NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
# A port: "443", "8000-8080" or a well-known name ("https"); bounds and names
# are checked by the validator.
PORT_STRING_PATTERN = "^([0-9]{1,5}(-[0-9]{1,5})?|[a-z][a-z0-9-]{0,31})$"
_LABEL = "[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
# "any", an IPv4/IPv6 address or CIDR (shape only; the validator parses it),
# or a DNS name with an optional leading "*." wildcard.
ADDRESS_PATTERN = (
    "^(any"
    "|[0-9]{1,3}([.][0-9]{1,3}){3}(/[0-9]{1,2})?"
    "|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(/[0-9]{1,3})?"
    f"|([*][.])?({_LABEL}[.])*{_LABEL}[.]?"
    ")$"
)
EXE_PATTERN = "^/.+$"
CGROUP_PATTERN = "^/.*$"
COMM_PATTERN = "^[^*?]+$"
"""The kernel compares a process name exactly (a hash lookup), so a wildcard would match nothing."""
PRINCIPAL_PATTERN = "^[A-Za-z_][A-Za-z0-9_.-]*[$]?$"

Name = Annotated[str, Meta(pattern=NAME_PATTERN, description="Lower-case-friendly identifier.")]
Address = Annotated[
    str,
    Meta(
        pattern=ADDRESS_PATTERN,
        description="IP address, CIDR, 'any', or DNS name ('*.example.com'). DNS names are not enforced yet.",
    ),
]
PortNumber = Annotated[int, Meta(ge=1, le=65535)]
PortString = Annotated[str, Meta(pattern=PORT_STRING_PATTERN)]
Port = PortNumber | PortString
Principal = Annotated[int, Meta(ge=0, le=4294967294)] | Annotated[str, Meta(pattern=PRINCIPAL_PATTERN)]
NonEmptyStr = Annotated[str, Meta(min_length=1)]
ExePath = Annotated[
    str, Meta(pattern=EXE_PATTERN, description="Absolute path; '*', '?' and '**' globs allowed.")
]
CgroupPath = Annotated[str, Meta(pattern=CGROUP_PATTERN, description="cgroup v2 path from the root.")]
Comm = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=15,
        pattern=COMM_PATTERN,
        description="Process name, compared exactly (no wildcards; use 'exe' globs for patterns).",
    ),
]


# gc=False: no document struct can be part of a reference cycle, and untracked they keep the cyclic
# collector's passes short while a 100k-rule policy is loaded and compiled.
class Who(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True, gc=False):
    """Which processes a rule applies to: every listed dimension must match (AND), any item in one list may.

    An absent dimension places no condition on the process.
    """

    exe: Annotated[list[ExePath], Meta(min_length=1)] | UnsetType = UNSET
    comm: Annotated[list[Comm], Meta(min_length=1)] | UnsetType = UNSET
    user: Annotated[list[Principal], Meta(min_length=1)] | UnsetType = UNSET
    group: Annotated[list[Principal], Meta(min_length=1)] | UnsetType = UNSET
    cgroup: Annotated[list[CgroupPath], Meta(min_length=1)] | UnsetType = UNSET
    unit: Annotated[list[NonEmptyStr], Meta(min_length=1)] | UnsetType = UNSET
    container: (
        Annotated[list[Annotated[str, Meta(pattern="^[0-9a-f]{6,64}$")]], Meta(min_length=1)] | UnsetType
    ) = UNSET


class Rule(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True, gc=False):
    """One policy rule. ``to`` is for egress, ``from`` for ingress, ``bind`` for listen; raw takes none."""

    name: Name
    action: Action
    direction: Direction
    description: str | UnsetType = UNSET
    audit: bool | UnsetType = UNSET
    who: Who | UnsetType = UNSET
    to: Annotated[list[Address], Meta(min_length=1)] | UnsetType = UNSET
    from_: Annotated[list[Address], Meta(min_length=1)] | UnsetType = msgspec.field(
        default=UNSET, name="from"
    )
    bind: Annotated[list[Address], Meta(min_length=1)] | UnsetType = UNSET
    ports: Annotated[list[Port], Meta(min_length=1)] | UnsetType = UNSET
    protocol: Protocol | UnsetType = UNSET


class DirectionDefaults(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True, gc=False):
    """Default action per direction; another file or the built-in default decides an absent one."""

    egress: DefaultAction | UnsetType = UNSET
    ingress: DefaultAction | UnsetType = UNSET
    listen: DefaultAction | UnsetType = UNSET
    raw: DefaultAction | UnsetType = UNSET


class Defaults(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True, gc=False):
    """What happens to a flow no rule matches, for each agent mode."""

    detect: DefaultAction | DirectionDefaults | UnsetType = UNSET
    prevent: DefaultAction | DirectionDefaults | UnsetType = UNSET


class Metadata(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True, gc=False):
    """Name and free-text description of one policy document."""

    name: Name
    description: str | UnsetType = UNSET


class Spec(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True, gc=False):
    """The body of a policy: its mode, defaults and ordered rules."""

    mode: PolicyMode | UnsetType = UNSET
    defaults: Defaults | UnsetType = UNSET
    rules: list[Rule] | UnsetType = UNSET


class Policy(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True, gc=False):
    """One policy document (``apiVersion: tool/v1``, ``kind: Policy``)."""

    apiVersion: Literal["tool/v1"]
    kind: Literal["Policy"]
    metadata: Metadata
    spec: Spec


BUILTIN_DEFAULTS: dict[str, dict[str, DefaultAction]] = {
    "detect": {d: "alert" for d in DIRECTIONS},
    "prevent": {d: "deny" for d in DIRECTIONS},
}
"""Used for a (mode, direction) no loaded file sets: flag everything in detect, refuse it in prevent."""
