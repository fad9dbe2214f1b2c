"""RESP2 for our own Redis connections: packing commands, parsing replies into redis-py types."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import redis.exceptions as redis_errors

__all__ = ["Arg", "Incomplete", "pack", "parse", "reply_error"]

CRLF = b"\r\n"
#: Replies that begin with these words are raised as the matching redis-py error.
_ERRORS: dict[str, type[redis_errors.RedisError]] = {
    "NOSCRIPT": redis_errors.NoScriptError,
    "NOAUTH": redis_errors.AuthenticationError,
    "WRONGPASS": redis_errors.AuthenticationError,
    "EXECABORT": redis_errors.ExecAbortError,
    "READONLY": redis_errors.ReadOnlyError,
}

Arg = str | bytes | int | float


class Incomplete(Exception):
    """The buffer ends inside a reply; wait for more bytes."""


_INCOMPLETE = Incomplete()  # raised often while bytes trickle in; one instance serves


def pack(args: Sequence[Arg]) -> bytes:
    """One command in RESP2 (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            raw = arg.encode()
        elif isinstance(arg, bytes):
            raw = arg
        else:
            raw = repr(arg).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(raw), raw))
    return b"".join(out)


def reply_error(message: str) -> redis_errors.ResponseError:
    """The redis-py error for an error reply, so `map_errors` can translate it."""
    cls = _ERRORS.get(message.partition(" ")[0], redis_errors.ResponseError)
    return cast(redis_errors.ResponseError, cls(message))


def parse(buf: bytes, pos: int) -> tuple[Any, int]:
    """Parse one RESP2 reply at `pos`; error replies come back as exception objects."""
    end = buf.find(CRLF, pos)
    if end < 0:
        raise _INCOMPLETE
    kind = buf[pos]
    if kind == 36:  # $ bulk string
        size = int(buf[pos + 1 : end])
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(buf) < stop + 2:
            raise _INCOMPLETE
        return buf[end + 2 : stop], stop + 2
    if kind == 58:  # : integer
        return int(buf[pos + 1 : end]), end + 2
    if kind == 43:  # + simple string
        return buf[pos + 1 : end], end + 2
    if kind == 42:  # * array
        count = int(buf[pos + 1 : end])
        pos = end + 2
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            item, pos = parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 45:  # - error
        return reply_error(buf[pos + 1 : end].decode(errors="replace")), end + 2
    raise redis_errors.InvalidResponse(f"unexpected reply type {chr(kind)!r}")
