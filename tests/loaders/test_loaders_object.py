"""Opening and loading objects: rodata knobs, autoload, error mapping, libbpf log routing."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest
import structlog

from loaders import BpfObject, errors

TEST_OBJECT = Path(__file__).parent / "data" / "test_progs.bpf.o"

pytestmark = pytest.mark.kernel


def test_open_missing_file_raises_not_found() -> None:
    with pytest.raises(errors.NotFound) as info:
        BpfObject.open("/nonexistent/prog.bpf.o")
    assert info.value.errno == errno.ENOENT
    assert "[Errno 2]" in str(info.value)


def test_load_from_bytes_exposes_programs_and_maps() -> None:
    with BpfObject.open(TEST_OBJECT.read_bytes()) as obj:
        obj.load()
        prog = obj.program("connect4_prog")
        assert prog.section == "cgroup/connect4"
        assert prog.fd > 0
        events = obj.map("events")
        assert events.max_entries == 64 * 1024
        assert {"kv", "prefixes", "calls"} <= {m.name for m in obj.maps()}


def test_verifier_rejection_carries_the_log() -> None:
    with BpfObject.open(TEST_OBJECT) as obj:
        for prog in obj.programs():
            prog.set_autoload(prog.name == "bad_prog")
        with pytest.raises(errors.VerifierError) as info:
            obj.load()
    assert info.value.errno == errno.EACCES
    assert "invalid mem access" in info.value.log
    assert "invalid mem access" in str(info.value)


def test_optional_program_is_not_loaded_by_default() -> None:
    with BpfObject.open(TEST_OBJECT) as obj:
        assert obj.program("bad_prog").autoload is False
        obj.load()  # would raise VerifierError if bad_prog were loaded
        with pytest.raises(errors.NotFound):
            _ = obj.program("bad_prog").fd


def test_set_rodata_writes_the_named_variable() -> None:
    with BpfObject.open(TEST_OBJECT) as obj:
        obj.set_rodata("event_magic", struct.pack("=I", 0xC0FFEE))
        obj.set_rodata("deny_port", struct.pack("=H", 4242))
        obj.load()
        rodata = obj.map(".rodata").lookup(bytes(4))
        assert rodata is not None
        assert struct.pack("=H", 4242) in rodata
        assert struct.pack("=I", 0xC0FFEE) in rodata


def test_set_rodata_rejects_unknown_names_and_wrong_sizes() -> None:
    with BpfObject.open(TEST_OBJECT) as obj:
        with pytest.raises(errors.NotFound):
            obj.set_rodata("no_such_knob", b"\0")
        with pytest.raises(ValueError, match="2 bytes"):
            obj.set_rodata("deny_port", b"\0\0\0\0")


def test_set_max_entries_before_load() -> None:
    with BpfObject.open(TEST_OBJECT) as obj:
        obj.map("kv").set_max_entries(7)
        obj.load()
        assert obj.map("kv").max_entries == 7
        with pytest.raises(errors.BpfError) as info:
            obj.map("kv").set_max_entries(9)
        assert info.value.errno == errno.EBUSY


def test_libbpf_log_goes_to_structlog() -> None:
    with structlog.testing.capture_logs() as logs, BpfObject.open(TEST_OBJECT) as obj:
        obj.load()
    messages = [entry["message"] for entry in logs if entry["event"] == "libbpf_log"]
    assert any("prog 'bad_prog': skipped loading" in m for m in messages)
    assert any("map 'kv': created successfully" in m for m in messages)


def test_close_is_idempotent_and_later_use_fails() -> None:
    obj = BpfObject.open(TEST_OBJECT)
    prog = obj.program("connect4_prog")
    obj.close()
    obj.close()
    assert obj.closed
    with pytest.raises(errors.BpfError, match="closed"):
        _ = prog.fd
