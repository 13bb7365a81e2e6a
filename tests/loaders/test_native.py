"""The native helper for policy swaps: found where it is built, refused sizes, a plain fallback where it is not."""

from __future__ import annotations

import random
from array import array
from pathlib import Path

import pytest

from loaders import doctor, native


def test_the_committed_helper_loads_for_this_architecture() -> None:
    assert Path(native.library_path()).is_file(), "run `make -C loaders/csrc` and commit the library"
    assert native.get() is not None
    check = doctor.check_native()
    assert (check.status, check.required) == (doctor.OK, False)


def test_missing_or_turned_off_means_the_python_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOOL_NATIVE", "0")
    assert native.get() is None
    assert doctor.check_native().status == doctor.INFO
    monkeypatch.delenv("TOOL_NATIVE")
    # As on an architecture without a build: the library is not there.
    monkeypatch.setattr(native, "library_path", lambda: str(tmp_path / "libtool_lpm.none.so"))
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    assert native.get() is None
    check = doctor.check_native()
    assert check.status == doctor.WARN and "make -C loaders/csrc" in check.advice


def test_pack_sorts_keys_like_integers_and_refuses_sizes_it_does_not_handle() -> None:
    helper = native.get()
    assert helper is not None
    rng = random.Random(3)
    # Key-shaped integers: a prefix length in the top byte, then slot, direction, protocol, address.
    ints = list({rng.randrange(32, 161) << 184 | rng.getrandbits(152) for _ in range(500)})
    keys = b"".join(i.to_bytes(24, "big") for i in ints)
    packed = helper.pack(keys, array("I", [24] * len(ints)), 24, 24, 16)
    assert packed.keys == b"".join(i.to_bytes(24, "big") for i in sorted(ints))
    assert [ints[i] for i in packed.order] == sorted(ints)
    with pytest.raises(ValueError, match="bytes of keys for"):
        helper.pack(keys[:-1], array("I", [24] * len(ints)), 24, 24, 16)
    with pytest.raises(ValueError, match="cannot pack"):  # keys are whole 8-byte words
        helper.pack(keys[: 20 * 10], array("I", [24] * 10), 20, 24, 16)
