"""The audit log's fast CONN line (from published JSON, a process rendered once) equals the
reference line of the decoded event, for any event, hostile names included."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.events import Anomaly, Cgroup, ConnectionEvent, Endpoint, Process, RuleRef
from pipeline.outputs.audit_format import ConnectionLines, connection_line

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)  # newlines, quotes, non-ASCII
NAME = st.one_of(st.none(), st.sampled_from(["curl", "/usr/bin/curl", "root", "web.service"]), TEXT)
PROCESS = st.builds(
    Process, pid=st.integers(1, 1 << 22), tid=st.integers(0, 9), ppid=st.integers(0, 9), uid=st.integers(0, 70000),
    gid=st.integers(0, 9), user=NAME, comm=st.one_of(st.just(""), TEXT), exe=NAME,
    cmdline=st.lists(TEXT, max_size=3), exec_id=st.integers(0, 1 << 50),
)  # fmt: skip
CGROUP = st.builds(Cgroup, id=st.integers(0, 1 << 40), path=NAME, systemd_unit=NAME, container_id=NAME)
ADDR = st.sampled_from(["127.0.0.1", "0.0.0.0", "::", "2001:db8::1", "10.1.2.3"])
EVENT = st.builds(
    ConnectionEvent,
    id=st.from_regex(r"[a-z0-9]{4}-[0-3]-[0-9]{1,6}", fullmatch=True),
    time_ns=st.integers(0, 4_000_000_000_000_000_000),
    host=st.sampled_from(["vm", "web-1", "odd host"]),
    kind=st.sampled_from(["connect", "sendmsg", "accept", "inbound", "bind", "socket"]),
    direction=st.sampled_from(["egress", "ingress", "listen", "raw"]),
    protocol=st.sampled_from(["tcp", "udp", "icmp", "200"]),
    family=st.sampled_from(["ipv4", "ipv6", "packet"]),
    verdict=st.sampled_from(["allowed", "blocked", "would-block", "alert"]),
    mode=st.sampled_from(["detect", "prevent"]),
    known=st.booleans(),
    rule=st.builds(RuleRef, id=st.integers(0, 5), name=NAME, policy=NAME, explanation=TEXT),
    local=st.builds(Endpoint, address=ADDR, port=st.integers(0, 65535), name=NAME),
    remote=st.builds(Endpoint, address=ADDR, port=st.integers(0, 65535), name=NAME),
    process=PROCESS,
    cgroup=CGROUP,
    netns_cookie=st.integers(0, 5),
    repeat=st.integers(0, 3),
    anomaly=st.one_of(st.none(), st.builds(Anomaly, score=st.floats(0, 1), reasons=st.lists(TEXT, max_size=2))),
    cpu=st.integers(0, 7),
    seq=st.integers(0, 1 << 40),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(EVENT, min_size=1, max_size=5))
def test_fast_line_equals_the_reference_line(events: list[ConnectionEvent]) -> None:
    lines = ConnectionLines(max_processes=2)  # small: the cache is emptied and refilled too
    for event in events * 2:  # the second time from the cache
        text, host, cpu, seq, time_ns = lines.line(msgspec.json.encode(event))
        assert text == connection_line(event)
        assert (host, cpu, seq, time_ns) == (event.host, event.cpu, event.seq, event.time_ns)
