"""JSON encoding of messages, job payloads and cached values (orjson; never pickle)."""

from __future__ import annotations

from typing import Any

import orjson

from .exceptions import SerializationError

# Datetimes, dataclasses and UUIDs would come back as strings or dicts, which
# silently changes the caller's data; passing them through makes them an error.
_OPTIONS = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def _refuse(value: Any) -> Any:
    raise TypeError(type(value).__name__)


def encode(value: Any, *, what: str = "value") -> bytes:
    """Encode JSON-compatible data to bytes.

    Args:
        value: dicts with string keys, lists, tuples, str, int, float, bool or None.
        what: how the error names the value, e.g. "cache key 'k'" or "message on 'chan'".
    """
    try:
        return orjson.dumps(value, default=_refuse, option=_OPTIONS)
    except TypeError as exc:
        raise SerializationError(
            f"{what} is not JSON-compatible data ({_describe(value, exc)}); "
            "convert it to dicts, lists, str, int, float, bool or None first"
        ) from exc


def decode(data: bytes | bytearray | memoryview | str) -> Any:
    """Decode bytes produced by `encode`; raises `SerializationError` on anything else."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise SerializationError(f"data is not valid JSON: {exc}") from exc


def _describe(value: Any, exc: TypeError) -> str:
    detail = str(exc)
    if "not JSON serializable" in detail or detail == "":
        return f"type {type(value).__name__}"
    if detail.isidentifier():
        return f"contains a {detail}"
    return detail
