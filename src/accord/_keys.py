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


def unescape(escaped: str) -> str | None:
    """The segment that `escape` turns into `escaped`; None if no segment does.

    A raw `:` means `escaped` is several joined segments; a `\\` must be
    followed by `\\` or `:`.
    """
    out: list[str] = []
    chars = iter(escaped)
    for char in chars:
        if char == SEPARATOR:
            return None
        if char == "\\":
            char = next(chars, "")
            if char not in ("\\", SEPARATOR):
                return None
        out.append(char)
    return "".join(out)


def glob_escape(name: str) -> str:
    """Escape glob metacharacters so a name matches itself in a Redis MATCH pattern."""
    out = []
    for char in name:
        if char in "*?[]\\":
            out.append("\\")
        out.append(char)
    return "".join(out)


def like_escape(name: str) -> str:
    """Escape LIKE metacharacters (`%`, `_`, `\\`) so a name matches itself with `ESCAPE '\\'`."""
    return name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
