"""Server-side names (keys, channels, tables rows) built from user segments without collisions."""

from __future__ import annotations

SEPARATOR = ":"


def escape(segment: str) -> str:
    """Escape one user segment so that joined names never collide.

    `("a:b", "c")` and `("a", "b:c")` become `a\\:b:c` and `a:b\\:c`.
    """
    return segment.replace("\\", "\\\\").replace(SEPARATOR, "\\" + SEPARATOR)


def join(*segments: str) -> str:
    """Escape each segment and join them with `:`."""
    return SEPARATOR.join(escape(segment) for segment in segments)


def glob_escape(name: str) -> str:
    """Escape glob metacharacters so a name matches itself in a Redis MATCH pattern."""
    out = []
    for char in name:
        if char in "*?[]\\":
            out.append("\\")
        out.append(char)
    return "".join(out)
