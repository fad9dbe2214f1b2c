"""Glob patterns for `Cache.keys`: Redis MATCH semantics on user keys, and the server-side form."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator

from ._keys import escape, glob_escape

__all__ = ["compile_glob", "server_match", "unescape"]

# One token of a pattern: ("lit", char), ("any", ""), ("one", ""), ("class", regex).
Token = tuple[str, str]


def _tokens(pattern: str) -> Iterator[Token]:
    i, size = 0, len(pattern)
    while i < size:
        char = pattern[i]
        if char == "*":
            yield "any", ""
        elif char == "?":
            yield "one", ""
        elif char == "\\" and i + 1 < size:
            i += 1
            yield "lit", pattern[i]
        elif char == "[":
            end, regex = _char_class(pattern, i + 1)
            if end < 0:  # an unterminated class is a literal bracket
                yield "lit", char
            else:
                i = end
                yield "class", regex
        else:
            yield "lit", char
        i += 1


def _char_class(pattern: str, i: int) -> tuple[int, str]:
    negate = i < len(pattern) and pattern[i] == "^"
    if negate:
        i += 1
    parts: list[str] = []
    while i < len(pattern) and pattern[i] != "]":
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            i += 1
            char = pattern[i]
        if i + 2 < len(pattern) and pattern[i + 1] == "-" and pattern[i + 2] != "]":
            low, high = sorted((char, pattern[i + 2]))
            parts.append(f"{re.escape(low)}-{re.escape(high)}")
            i += 3
            continue
        parts.append(re.escape(char))
        i += 1
    if i >= len(pattern):
        return -1, ""
    body = "".join(parts)
    if not body:
        return i, "[^\\s\\S]" if not negate else "[\\s\\S]"
    return i, f"[{'^' if negate else ''}{body}]"


@functools.lru_cache(maxsize=256)
def compile_glob(pattern: str) -> Callable[[str], object]:
    """A matcher (`fullmatch`) for a Redis-style glob over raw (unescaped) keys."""
    out = []
    for kind, value in _tokens(pattern):
        if kind == "any":
            out.append("[\\s\\S]*")
        elif kind == "one":
            out.append("[\\s\\S]")
        elif kind == "class":
            out.append(value)
        else:
            out.append(re.escape(value))
    return re.compile("".join(out)).fullmatch


def server_match(namespace: str, pattern: str) -> str:
    """A MATCH pattern over stored (escaped) keys that selects at least every key `pattern` does.

    Literal characters become their escaped stored form; a `?` or a class
    may stand for a two-character escape, so it widens to `?*`. The caller
    filters the results again with `compile_glob` for the exact answer.
    """
    out = [glob_escape(namespace), ":"]
    for kind, value in _tokens(pattern):
        if kind == "any":
            out.append("*")
        elif kind == "lit":
            out.append(glob_escape(escape(value)))
        else:
            out.append("?*")
    return "".join(out)


def unescape(stored: str) -> str:
    """Undo `accord._keys.escape` on one segment."""
    if "\\" not in stored:
        return stored
    out, i = [], 0
    while i < len(stored):
        if stored[i] == "\\" and i + 1 < len(stored):
            i += 1
        out.append(stored[i])
        i += 1
    return "".join(out)
