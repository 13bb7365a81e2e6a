"""Map access: CRUD, LPM tries, per-CPU values, batches with fallback, iteration, pinning."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from loaders import BpfObject, Map, errors
from loaders._ffi import lib

TEST_OBJECT = Path(__file__).parent / "data" / "test_progs.bpf.o"

pytestmark = pytest.mark.kernel


@pytest.fixture
def obj() -> Iterator[BpfObject]:
    with BpfObject.open(TEST_OBJECT) as loaded:
        loaded.load()
        yield loaded


def u32(n: int) -> bytes:
    return struct.pack("=I", n)


def u64(n: int) -> bytes:
    return struct.pack("=Q", n)


def lpm_key(prefixlen: int, addr: str) -> bytes:
    return struct.pack("=I", prefixlen) + bytes(int(octet) for octet in addr.split("."))


def test_hash_crud(obj: BpfObject) -> None:
    kv = obj.map("kv")
    assert (kv.key_size, kv.value_size, kv.max_entries) == (4, 8, 64)
    assert kv.lookup(u32(1)) is None
    kv.update(u32(1), u64(10))
    assert kv.lookup(u32(1)) == u64(10)
    kv.update(u32(1), u64(11))
    assert kv.lookup(u32(1)) == u64(11)
    assert kv.delete(u32(1)) is True
    assert kv.delete(u32(1)) is False


def test_update_with_noexist_flag_reports_eexist(obj: BpfObject) -> None:
    kv = obj.map("kv")
    kv.update(u32(3), u64(1))
    with pytest.raises(errors.BpfError) as info:
        kv.update(u32(3), u64(2), flags=1)
    assert info.value.errno == 17


def test_wrong_key_size_is_refused(obj: BpfObject) -> None:
    with pytest.raises(ValueError, match="4 bytes"):
        obj.map("kv").lookup(b"\0")


def test_keys_and_items_cover_every_entry(obj: BpfObject) -> None:
    kv = obj.map("kv")
    for i in range(10):
        kv.update(u32(i), u64(i * i))
    assert sorted(kv.keys()) == sorted(u32(i) for i in range(10))
    assert dict(kv.items()) == {u32(i): u64(i * i) for i in range(10)}


def test_batch_update_and_clear_on_hash(obj: BpfObject) -> None:
    kv = obj.map("kv")
    kv.update_batch([u32(i) for i in range(20)], [u64(i) for i in range(20)])
    assert kv.lookup(u32(19)) == u64(19)
    assert kv.delete_batch([u32(0), u32(1)]) == 2
    kv.clear()
    assert list(kv.keys()) == []


def test_lpm_trie_longest_prefix_wins(obj: BpfObject) -> None:
    prefixes = obj.map("prefixes")
    prefixes.update(lpm_key(8, "10.0.0.0"), u32(1))
    prefixes.update(lpm_key(24, "10.1.2.0"), u32(2))
    assert prefixes.lookup(lpm_key(32, "10.1.2.3")) == u32(2)
    assert prefixes.lookup(lpm_key(32, "10.9.9.9")) == u32(1)
    assert prefixes.lookup(lpm_key(32, "192.168.0.1")) is None


def test_lpm_batch_update_falls_back_to_single_updates(obj: BpfObject) -> None:
    prefixes = obj.map("prefixes")
    keys = [lpm_key(16, f"10.{i}.0.0") for i in range(10)]
    prefixes.update_batch(keys, [u32(i) for i in range(10)])
    assert prefixes.lookup(lpm_key(32, "10.7.1.1")) == u32(7)
    assert prefixes.delete_batch(keys[:3]) == 3
    prefixes.clear()
    assert list(prefixes.keys()) == []


def test_percpu_lookup_returns_one_value_per_cpu(obj: BpfObject) -> None:
    calls = obj.map("calls")
    cpus = lib().libbpf_num_possible_cpus()
    calls.update(u32(1), b"".join(u64(100 + cpu) for cpu in range(cpus)))
    assert calls.lookup_percpu(u32(1)) == [u64(100 + cpu) for cpu in range(cpus)]
    with pytest.raises(ValueError, match="per-CPU"):
        calls.lookup(u32(1))


def test_pinned_map_outlives_its_object(pin_dir: Path) -> None:
    path = pin_dir / "kv"
    with BpfObject.open(TEST_OBJECT) as obj:
        obj.load()
        obj.map("kv").update(u32(5), u64(55))
        obj.map("kv").pin(path)
    with Map.open_pinned(path) as pinned:
        assert (pinned.key_size, pinned.value_size, pinned.max_entries) == (4, 8, 64)
        assert pinned.lookup(u32(5)) == u64(55)
        pinned.update(u32(6), u64(66))
        pinned.unpin(path)
    assert not os.path.exists(path)


def test_open_pinned_missing_raises_not_found(pin_dir: Path) -> None:
    with pytest.raises(errors.NotFound):
        Map.open_pinned(pin_dir / "absent")
