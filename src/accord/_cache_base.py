"""What every cache module shares: the MISSING sentinel and the checks on keys and TTLs."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from typing import Any, Final

__all__ = ["MISSING", "Missing", "check_key", "check_keys", "check_ttl"]


class Missing(enum.Enum):
    """The type of `MISSING`: "no such key", distinct from a stored `None`."""

    MISSING = "MISSING"

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "MISSING"


#: Returned by `Cache.ttl` for a key that does not exist; usable as `get(key, default=MISSING)`.
MISSING: Final = Missing.MISSING


def check_ttl(ttl: Any, what: str) -> float | None:
    """Seconds > 0 (or `math.inf`: never expires) -> seconds or None; anything else is a ValueError."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or math.isnan(ttl) or ttl <= 0:
        raise ValueError(f"{what}: {ttl!r} is not a positive number of seconds (or None)")
    return None if math.isinf(ttl) else float(ttl)


def check_key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"cache keys are strings, got {type(key).__name__} {key!r}")
    return key


def check_keys(keys: Iterable[str]) -> list[str]:
    if isinstance(keys, str | bytes):
        raise TypeError(f"expected a list of keys, got the single key {keys!r}")
    return [check_key(key) for key in keys]
