"""Diagnostics: what is wrong with a policy, where (file:line:column), and a hint to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem found in a policy source.

    Attributes:
        file: The source file, as given by the user.
        line: 1-based line, or 0 when the position is unknown (e.g. a .cue source).
        column: 1-based column, or 0 when unknown.
        message: What is wrong and what was expected.
        hint: An optional suggestion ("did you mean 'egress'?").
        severity: ``error`` or ``warning``.
    """

    file: str
    line: int
    column: int
    message: str
    hint: str = ""
    severity: str = "error"

    def location(self) -> str:
        """Return ``file:line:column`` (or just ``file`` when the position is unknown)."""
        if self.line <= 0:
            return self.file
        return f"{self.file}:{self.line}:{self.column}"

    def __str__(self) -> str:
        prefix = "" if self.severity == "error" else f"{self.severity}: "
        text = f"{self.location()}: {prefix}{self.message}"
        if self.hint:
            text += f" (hint: {self.hint})"
        return text


class PolicyError(Exception):
    """A policy could not be loaded or compiled; ``errors`` lists every problem found."""

    def __init__(self, errors: Sequence[Diagnostic]) -> None:
        self.errors: list[Diagnostic] = list(errors)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``"did you mean 'x'?"`` for the closest choice, or a list of the choices when none is close."""
    options = sorted(set(choices))
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    if len(options) <= 12:
        return "expected one of: " + ", ".join(options)
    return ""
