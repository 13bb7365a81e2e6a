"""The glob dialect of ``who`` patterns: ``*`` and ``?`` stay within one path segment, ``**`` crosses them."""

from __future__ import annotations

import functools
import re


@functools.lru_cache(maxsize=4096)
def compile_glob(pattern: str) -> re.Pattern[str]:
    """Translate a glob into an anchored regular expression.

    ``**/`` matches zero or more leading directories, ``**`` anything, ``*`` anything but ``/``,
    ``?`` one character but ``/``; everything else is literal.
    """
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z", re.S)


def glob_match(pattern: str, value: str) -> bool:
    """Return whether ``value`` matches the whole ``pattern``."""
    return compile_glob(pattern).match(value) is not None


def is_glob(pattern: str) -> bool:
    """Return whether ``pattern`` has any wildcard."""
    return "*" in pattern or "?" in pattern


def example_of(pattern: str) -> str:
    """Return one concrete string the glob matches (wildcards replaced by 'x')."""
    return pattern.replace("**/", "").replace("**", "x").replace("*", "x").replace("?", "x")
