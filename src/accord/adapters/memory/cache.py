"""MemoryStore: a cache store in this process, one LRU per cache, a TTL per entry."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from time import monotonic
from typing import TYPE_CHECKING, Any

import orjson

from ..._cache_base import MISSING, Missing, check_key
from ..._cache_glob import compile_glob
from ...exceptions import CacheError, ConfigError

if TYPE_CHECKING:
    from ...config import Settings

__all__ = ["MemoryStore"]

DEFAULT_MAX = 2000
INT64 = 2**63

# How a read hands out a value the caller can never use to mutate what is
# stored: each entry keeps, beside the value, a `copy` function and the
# `children` whose containers get copied too (see `_copy_plan`). Scalars
# need neither; most records are a dict or list with flat containers in it,
# copied by `dict.copy`/`list.copy` and a loop over `children` in the reader
# itself; deeper values get a recursive copier built once for their shape;
# values with many containers keep their JSON bytes and `orjson.loads`.
#: Past this many nested containers, orjson (C) rebuilds a value faster than a Python copy.
COPY_BUDGET = 16

_CONTAINERS = (dict, list)
Copier = Callable[[Any], Any]
# (data, value, copy or None, expires_at or None, children)
Entry = tuple[bytes, Any, Copier | None, float | None, tuple[Any, ...]]


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
        self._entries: OrderedDict[str, Entry] = OrderedDict()

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

    def reader(self) -> Callable[[str, Any], Awaitable[Any]]:
        """An async `get(key, default)` over this store, for the Cache to bind as its own `get`.

        It reads the table directly, so a hit costs one coroutine call where
        `Cache.get` calling `peek` costs three frames. `peek` below is the same
        lookup for synchronous callers (`mget`, `wrap`, the near cache's L1).
        """
        entries = self._entries
        find, touch = entries.get, entries.move_to_end

        async def get(key: str, default: Any = None) -> Any:
            try:
                entry = find(key)
            except TypeError:  # unhashable: check_key says what is wrong
                entry = None
            if entry is None:
                check_key(key)
                return default
            _, value, copy, expires, children = entry
            if expires is not None and expires <= monotonic():
                del entries[key]
                return default
            touch(key)
            if copy is None:
                return value
            fresh = copy(value)
            for child in children:
                fresh[child] = fresh[child].copy()
            return fresh

        return get

    def peek(self, key: str) -> Any:
        """The decoded value of `key`, or `MISSING`; a fresh object each time."""
        entries = self._entries
        try:
            entry = entries.get(key)
        except TypeError:  # unhashable: check_key says what is wrong
            entry = None
        if entry is None:
            check_key(key)
            return MISSING
        _, value, copy, expires, children = entry
        if expires is not None and expires <= monotonic():
            del entries[key]
            return MISSING
        entries.move_to_end(key)
        if copy is None:
            return value
        fresh = copy(value)
        for child in children:
            fresh[child] = fresh[child].copy()
        return fresh

    def peek_data(self, key: str) -> bytes | None:
        entry = self._live(key)
        return None if entry is None else entry[0]

    def _live(self, key: str) -> Entry | None:
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
        value, copy, children = _copy_plan(orjson.loads(data), data)
        expires = None if ttl is None else monotonic() + ttl
        entries = self._entries
        entries[key] = (data, value, copy, expires, children)
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


def _copy_plan(value: Any, data: bytes) -> tuple[Any, Copier | None, tuple[Any, ...]]:
    """What an entry keeps of `value` (JSON `data`) so each read makes a fresh object cheaply.

    Returns (kept, copy, children): a read hands out `kept` itself when `copy`
    is None, else `copy(kept)` with each of `children` (keys or indexes)
    replaced by a shallow copy of the container there.
    """
    if not isinstance(value, _CONTAINERS):
        return value, None, ()  # a scalar: immutable
    inner = []
    flat = True
    for key, item in _items(value):
        if isinstance(item, _CONTAINERS):
            inner.append(key)
            flat = flat and _is_flat(item)
    if flat and len(inner) <= COPY_BUDGET:
        return value, type(value).copy, tuple(inner)
    copy = _copier(value, [COPY_BUDGET])
    if copy is None:
        return data, orjson.loads, ()
    return value, copy, ()


def _is_flat(value: dict[str, Any] | list[Any]) -> bool:
    for item in value.values() if isinstance(value, dict) else value:
        if isinstance(item, _CONTAINERS):
            return False
    return True


def _items(value: dict[str, Any] | list[Any]) -> Iterable[tuple[Any, Any]]:
    return value.items() if isinstance(value, dict) else enumerate(value)


def _copier(value: dict[str, Any] | list[Any], budget: list[int]) -> Copier | None:
    """A function copying `value` and every container in it; None past the budget."""
    children = []
    for key, item in _items(value):
        if isinstance(item, _CONTAINERS):
            budget[0] -= 1
            copy = _copier(item, budget) if budget[0] >= 0 else None
            if copy is None:
                return None
            children.append((key, copy))
    shallow: Copier = type(value).copy
    if not children:
        return shallow
    pairs = tuple(children)

    def copy_all(value: Any) -> Any:
        out = shallow(value)
        for key, copy in pairs:
            out[key] = copy(out[key])
        return out

    return copy_all
