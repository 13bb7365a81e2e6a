"""Port specifications: numbers, ranges ("8000-8080") and the well-known service names we accept."""

from __future__ import annotations

WELL_KNOWN_PORTS: dict[str, int] = {
    "ftp": 21,
    "ssh": 22,
    "telnet": 23,
    "smtp": 25,
    "dns": 53,
    "domain": 53,
    "dhcp": 67,
    "tftp": 69,
    "http": 80,
    "kerberos": 88,
    "pop3": 110,
    "ntp": 123,
    "imap": 143,
    "snmp": 161,
    "ldap": 389,
    "https": 443,
    "smb": 445,
    "submissions": 465,
    "syslog": 514,
    "submission": 587,
    "ldaps": 636,
    "dns-over-tls": 853,
    "imaps": 993,
    "pop3s": 995,
    "mssql": 1433,
    "nfs": 2049,
    "etcd": 2379,
    "mysql": 3306,
    "rdp": 3389,
    "nats": 4222,
    "syslog-tls": 6514,
    "postgres": 5432,
    "postgresql": 5432,
    "amqp": 5672,
    "kubernetes-api": 6443,
    "redis": 6379,
    "http-alt": 8080,
    "prometheus": 9090,
    "node-exporter": 9100,
    "kafka": 9092,
    "kubelet": 10250,
    "memcached": 11211,
    "mongodb": 27017,
}
"""Service name -> port. Names, not protocols: ``dns`` means port 53 over whichever protocol the rule says."""


def parse_port(spec: int | str) -> tuple[int, int]:
    """Turn one port spec into an inclusive ``(low, high)`` range.

    Args:
        spec: A number (443), a numeric string ("443"), a range ("8000-8080") or a name ("https").

    Returns:
        The inclusive range.

    Raises:
        ValueError: With a message saying what is wrong and what was expected.
    """
    if isinstance(spec, int):
        if not 1 <= spec <= 65535:
            raise ValueError(f"port {spec} is out of range, expected 1-65535")
        return spec, spec
    text = spec.strip()
    if text in WELL_KNOWN_PORTS:
        port = WELL_KNOWN_PORTS[text]
        return port, port
    low_text, sep, high_text = text.partition("-")
    if low_text.isdigit() and (not sep or high_text.isdigit()):
        low = int(low_text)
        high = int(high_text) if sep else low
        for value in (low, high):
            if not 1 <= value <= 65535:
                raise ValueError(f"port {value} is out of range, expected 1-65535")
        if low > high:
            raise ValueError(f"port range '{text}' is reversed, expected low-high (e.g. '{high}-{low}')")
        return low, high
    raise ValueError(
        f"unknown port name '{text}', expected a number, a range like '8000-8080' or a service name"
    )


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge overlapping or adjacent ranges, sorted by low end."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged
