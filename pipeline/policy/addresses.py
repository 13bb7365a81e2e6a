"""Address specifications: IPs, CIDRs, ``any`` and DNS names, all mapped into one IPv6 space."""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field

ANY_NETWORK = ipaddress.IPv6Network("::/0")
_V4_MAPPED_BASE = int(ipaddress.IPv6Address("::ffff:0:0"))
# A canonical dotted quad with an optional canonical prefix length: the common case, parsed here
# without the general parser. Anything else (leading zeros, IPv6, errors) takes the general path.
_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_PLAIN_V4 = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}(?:/(3[0-2]|[12]?[0-9]))?")
_DNS_NAME = re.compile(
    r"^(\*\.)?([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?$"
)


@dataclass(frozen=True, slots=True)
class ParsedAddress:
    """An address spec after parsing: exactly one of ``network`` and ``dns_name`` is set.

    ``address`` and ``prefixlen`` repeat ``network``'s first address and length as plain integers
    (0 for a DNS name), and ``bits`` is ``prefixlen << 184 | address``: the network's part of the
    integer key the compiler groups entries by (the kernel's LPM key read as one big-endian number,
    whose length byte sits at bit 184), without touching ``network``.
    """

    network: ipaddress.IPv6Network | None
    dns_name: str | None
    address: int = 0
    prefixlen: int = 0
    bits: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", self.prefixlen << 184 | self.address)


def _network(net: ipaddress.IPv6Network) -> ParsedAddress:
    return ParsedAddress(net, None, int(net.network_address), net.prefixlen)


def to_v6_network(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> ipaddress.IPv6Network:
    """Map an IPv4 network into ``::ffff:0:0/96`` (IPv6 networks are returned unchanged)."""
    if isinstance(net, ipaddress.IPv6Network):
        return net
    base = ipaddress.IPv6Address(_V4_MAPPED_BASE + int(net.network_address))
    return ipaddress.IPv6Network(f"{base}/{96 + net.prefixlen}")


def to_v6_address(text: str) -> ipaddress.IPv6Address:
    """Parse an IPv4 or IPv6 address, mapping IPv4 into ``::ffff:0:0/96``.

    Raises:
        ValueError: ``text`` is not an IP address.
    """
    addr = ipaddress.ip_address(text.strip().strip("[]"))
    if isinstance(addr, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(_V4_MAPPED_BASE + int(addr))
    return addr


def display_address(addr: ipaddress.IPv6Address) -> str:
    """Show a v4-mapped address as plain IPv4."""
    return str(addr.ipv4_mapped) if addr.ipv4_mapped is not None else str(addr)


def display_network(net: ipaddress.IPv6Network) -> str:
    """Show a network the way a user would write it (IPv4 for v4-mapped, 'any' for ::/0)."""
    if net.prefixlen == 0:
        return "any"
    mapped = net.network_address.ipv4_mapped
    if mapped is not None and net.prefixlen >= 96:
        prefix = net.prefixlen - 96
        return str(mapped) if prefix == 32 else f"{mapped}/{prefix}"
    return str(net.network_address) if net.prefixlen == 128 else str(net)


@functools.lru_cache(maxsize=1 << 18)
def parse_address(spec: str) -> ParsedAddress:
    """Parse one address spec.

    Args:
        spec: ``any``, an IP, a CIDR (host bits must be zero), or a DNS name with an optional ``*.``.

    Returns:
        The parsed address.

    Raises:
        ValueError: With a message saying what is wrong and what was expected.
    """
    text = spec.strip()
    if text == "any":
        return _network(ANY_NETWORK)
    if plain := _PLAIN_V4.fullmatch(text):
        a, b, c, d, length = plain.groups()
        prefix = 32 if length is None else int(length)
        value = int(a) << 24 | int(b) << 16 | int(c) << 8 | int(d)
        if value & ((1 << (32 - prefix)) - 1) == 0:
            address = _V4_MAPPED_BASE + value
            return ParsedAddress(ipaddress.IPv6Network((address, 96 + prefix)), None, address, 96 + prefix)
    looks_ip = ":" in text or bool(re.fullmatch(r"[0-9./]+", text))
    if looks_ip:
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            if "has host bits set" in str(exc):
                fixed = ipaddress.ip_network(text, strict=False)
                raise ValueError(f"CIDR '{text}' has host bits set, expected e.g. '{fixed}'") from None
            raise ValueError(f"'{text}' is not a valid IP address or CIDR") from None
        return _network(to_v6_network(net))
    if _DNS_NAME.fullmatch(text) and "*" not in text[2:]:
        return ParsedAddress(None, text.lower().rstrip("."))
    raise ValueError(f"'{text}' is not an IP address, CIDR, 'any' or DNS name")
