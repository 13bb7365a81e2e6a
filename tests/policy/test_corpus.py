"""The shared corpus goes through the JSON Schema, the real cue CLI and our validator, which must agree.

valid/: everyone accepts. invalid/: everyone rejects. invalid-semantic/: the schemas accept (they
cannot express the check) and only the Python validator rejects; see docs/policy.md.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml

from pipeline.policy import PolicyError, load_policy

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).parent / "corpus"
SCHEMA = json.loads((ROOT / "docs" / "policy.schema.json").read_text())
CUE_SCHEMA = ROOT / "cue" / "policy" / "schema.cue"
VALID = sorted((CORPUS / "valid").glob("*.yaml"))
INVALID = sorted((CORPUS / "invalid").glob("*.yaml"))
SEMANTIC = sorted((CORPUS / "invalid-semantic").glob("*.yaml"))
ALL = [*VALID, *INVALID, *SEMANTIC]


def _schema_accepts(path: Path) -> bool:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    return not list(validator.iter_errors(yaml.safe_load(path.read_text())))


def _cue_accepts(cue: str, path: Path) -> bool:
    proc = subprocess.run(
        [cue, "vet", "-d", "#Policy", str(CUE_SCHEMA), str(path)], capture_output=True, text=True, timeout=120
    )
    return proc.returncode == 0


def _validator_accepts(path: Path) -> bool:
    try:
        load_policy([path])
    except PolicyError:
        return False
    return True


def test_corpus_is_not_empty() -> None:
    assert len(VALID) >= 3 and len(INVALID) >= 10 and len(SEMANTIC) >= 5


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("path", ALL, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_json_schema_verdict(path: Path) -> None:
    assert _schema_accepts(path) == (path.parent.name != "invalid")


@pytest.mark.parametrize("path", ALL, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_validator_verdict(path: Path) -> None:
    assert _validator_accepts(path) == (path.parent.name == "valid")


@pytest.mark.parametrize("path", ALL, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_cue_verdict(cue_exe: str, path: Path) -> None:
    assert _cue_accepts(cue_exe, path) == (path.parent.name != "invalid")


def test_cue_policy_file_embedding_the_schema_loads(cue_exe: str, tmp_path: Path) -> None:
    """A `package policy` .cue file that embeds #Policy loads through `cue export` with our schema."""
    source = (ROOT / "docs" / "policy-examples" / "resolvers.cue").read_text()
    (tmp_path / "p.cue").write_text(source)
    loaded = load_policy([tmp_path / "p.cue"])
    assert [d.policy.metadata.name for d in loaded.documents] == ["resolvers"]


def test_cue_policy_errors_point_at_the_users_file(cue_exe: str, tmp_path: Path) -> None:
    source = (ROOT / "docs" / "policy-examples" / "resolvers.cue").read_text().replace('"udp"', '"udpx"')
    (tmp_path / "p.cue").write_text(source)
    with pytest.raises(PolicyError) as exc:
        load_policy([tmp_path / "p.cue"])
    assert all(e.file == str(tmp_path / "p.cue") and e.line > 0 for e in exc.value.errors)
