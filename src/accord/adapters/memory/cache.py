"""MemoryStore: a cache store in this process, one LRU per cache, a TTL per entry."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from time import monotonic
from typing import TYPE_CHECKING, Any

import orjson

from ..._cache_base import MISSING, Missing
from ..._cache_glob import compile_glob
from ...exceptions import CacheError, ConfigError

if TYPE_CHECKING:
    from ...config import Settings

__all__ = ["MemoryStore"]

DEFAULT_MAX = 2000
INT64 = 2**63

# How `peek` hands out a value so the caller can never mutate what is stored.
# An entry's plan is one of:
#   None       a scalar (str, int, float, bool, None): immutable already, returned as is;
#   a tuple    a container: copied, and each (key, subplan) child container copied too;
#   _DECODE    a container with many nested containers: decoding the bytes is faster.
_DECODE = False
#: Past this many nested containers, orjson (C) rebuilds a value faster than a Python copy.
COPY_BUDGET = 16

_SCALARS = (str, int, float, bool, type(None))
Plan = tuple[tuple[Any, "Plan"], ...]


class MemoryStore:
    """A cache store held in this process: an LRU of at most `max` entries, each with its own TTL.

    Nothing is shared with other instances, even in one process: each cache
    has its own store. Values are kept as their JSON bytes (and, when cheap to
    copy, as a decoded object too), so what `get` returns is always a fresh object.

    Args:
        namespace: unused (each cache has its own store); accepted for the store factory signature.
        settings: unused; accepted for the store factory signature.
        max: the most entries kept; the least recently used one goes first. Default 2000.
    """

    #: A miss here is final: the Cache answers from `peek` without awaiting `get`.
    authoritative = True

    def __init__(
        self, *, namespace: str = "", settings: Settings | None = None, max: int = DEFAULT_MAX
    ) -> None:
        if not isinstance(max, int) or isinstance(max, bool) or max < 1:
            raise ConfigError(f"memory cache store: max={max!r} must be a positive integer")
        self.max = max
        # key -> (data, value, plan, expires_at or None); see _DECODE for the plans
        self._entries: OrderedDict[str, tuple[bytes, Any, Any, float | None]] = OrderedDict()

    def __repr__(self) -> str:
        return f"<MemoryStore {len(self._entries)}/{self.max}>"

    def __len__(self) -> int:
        return len(self._entries)

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        self._entries.clear()

    async def abort(self) -> None:
        self._entries.clear()

    # The synchronous core; the async protocol methods below wrap it.

    def peek(self, key: str) -> Any:
        """The decoded value of `key`, or `MISSING`; a fresh object each time."""
        entry = self._live(key)
        if entry is None:
            return MISSING
        data, value, plan, _ = entry
        if plan is None:
            return value
        if plan is _DECODE:
            return orjson.loads(data)
        return _copy(value, plan)

    def peek_data(self, key: str) -> bytes | None:
        entry = self._live(key)
        return None if entry is None else entry[0]

    def _live(self, key: str) -> tuple[bytes, Any, Any, float | None] | None:
        """The entry of `key` unless it has expired (then it is dropped); marks it recently used."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[3] is not None and entry[3] <= monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, data: bytes, ttl: float | None) -> None:
        """Store `data` (valid JSON bytes) under `key` for `ttl` seconds (None: no expiry)."""
        value = orjson.loads(data)
        plan: Any = None
        if not isinstance(value, _SCALARS):
            plan = _plan(value, [COPY_BUDGET])
            if plan is None:
                plan, value = _DECODE, None
        expires = None if ttl is None else monotonic() + ttl
        entries = self._entries
        entries[key] = (data, value, plan, expires)
        entries.move_to_end(key)
        while len(entries) > self.max:
            entries.popitem(last=False)

    def discard(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def expiry(self, key: str) -> float | None | Missing:
        entry = self._entries.get(key)
        if entry is None:
            return MISSING
        expires = entry[3]
        if expires is None:
            return None
        remaining = expires - monotonic()
        if remaining <= 0:
            del self._entries[key]
            return MISSING
        return remaining

    # The CacheStore protocol.

    async def get(self, key: str) -> bytes | None:
        return self.peek_data(key)

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self.peek_data(key) for key in keys]

    async def set(self, key: str, data: bytes, ttl: float | None) -> None:
        self.put(key, data, ttl)

    async def mset(self, items: Sequence[tuple[str, bytes]], ttl: float | None) -> None:
        for key, data in items:
            self.put(key, data, ttl)

    async def delete(self, keys: Sequence[str]) -> None:
        self.discard(keys)

    async def keys(self, pattern: str) -> list[str]:
        now = monotonic()
        live = [key for key, entry in self._entries.items() if entry[3] is None or entry[3] > now]
        if pattern == "*":
            return live
        match = compile_glob(pattern)
        return [key for key in live if match(key)]

    async def reset(self) -> None:
        self.clear()

    async def ttl(self, key: str) -> float | None | Missing:
        return self.expiry(key)

    async def incrby(self, key: str, amount: int, ttl: float | None) -> int:
        data = self.peek_data(key)
        if data is None:
            current, expires_in = 0, ttl
        else:
            current = orjson.loads(data)
            if not isinstance(current, int) or isinstance(current, bool):
                raise CacheError(
                    f"cannot increment key {key!r}: it holds a {type(current).__name__}, not an integer"
                )
            remaining = self.expiry(key)
            expires_in = None if isinstance(remaining, Missing) else remaining
        result = current + amount
        if not -INT64 <= result < INT64:
            raise CacheError(f"cannot increment key {key!r}: the result overflows 64 bits")
        self.put(key, b"%d" % result, expires_in)
        return result

    async def update(
        self, key: str, change: Callable[[bytes | None], bytes | None], ttl: float | None
    ) -> None:
        old = self.peek_data(key)
        new = change(old)
        if new is None:
            return
        if old is not None:
            remaining = self.expiry(key)
            ttl = None if isinstance(remaining, Missing) else remaining
        self.put(key, new, ttl)


def _plan(value: dict[str, Any] | list[Any], budget: list[int]) -> Plan | None:
    """Which children of `value` are containers, recursively; None past the budget."""
    plan = []
    for key, item in value.items() if isinstance(value, dict) else enumerate(value):
        if isinstance(item, dict | list):
            budget[0] -= 1
            sub = _plan(item, budget) if budget[0] >= 0 else None
            if sub is None:
                return None
            plan.append((key, sub))
    return tuple(plan)


def _copy(value: Any, plan: Plan) -> Any:
    out = value.copy()
    for child, sub in plan:
        out[child] = _copy(out[child], sub) if sub else out[child].copy()
    return out
