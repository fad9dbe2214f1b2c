"""Cache: the API plugins call (get, set, wrap, counters, object helpers) over one store."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import _keys
from ._cache_base import MISSING, Missing, check_key, check_keys, check_ttl
from ._cache_wrap import (
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_LOCK_TTL,
    Compute,
    Predicate,
    ReadThrough,
    call,
)
from ._codec import decode, encode
from .exceptions import CacheError, SerializationError, StateError

if TYPE_CHECKING:
    import logging

    from .app import Application
    from .cache import CacheStore

__all__ = ["Cache"]


class Cache:
    """A named cache of JSON-compatible values under string keys, kept in one store.

    Values are encoded to JSON on the way in (an unencodable value raises
    `SerializationError` naming the key and the type) and decoded on the way
    out, so what `get` returns is always a fresh object. Data in the store that
    is not JSON (planted by another program) reads as a miss, with a warning.

    Args:
        name: the cache name.
        prefix: the namespace of its keys inside the app.
        store: where the values live (a `CacheStore`).
        app: the application (its lock manager serves `wrap(lock=True)`).
        log: the logger to write warnings to.
        ttl: default seconds for writes that give none. Default None (no expiry).

    Example:
        cache = await app.cache_manager.create_cache(name="auth", store="redis")
        await cache.set("token:config", {"ttl": 3600}, ttl=60)
        config = await cache.wrap("token:config", load_config, ttl=60)
    """

    def __init__(
        self,
        name: str,
        prefix: str,
        store: CacheStore,
        *,
        app: Application,
        log: logging.LoggerAdapter[logging.Logger],
        ttl: float | None = None,
    ) -> None:
        self.name = name
        self.prefix = prefix
        self.app = app
        self.log = log
        self.default_ttl = ttl
        self._store: CacheStore = store
        peek = getattr(store, "peek", None)
        self._peek: Callable[[str], Any] | None = peek if callable(peek) else None
        self._authoritative = self._peek is not None and bool(
            getattr(store, "authoritative", False)
        )
        self._read_through = ReadThrough(self)
        reader = getattr(store, "reader", None)
        if self._authoritative and callable(reader):
            # The store answers every read in this process: its direct reader is this
            # cache's `get` (same contract, two Python frames fewer on a hit).
            get = reader()
            get.__doc__ = Cache.get.__doc__
            self.get = get  # type: ignore[method-assign]

    def __repr__(self) -> str:
        return f"<Cache {self.name!r} prefix={self.prefix!r} store={type(self._store).__name__}>"

    @property
    def store(self) -> CacheStore:
        """The store behind this cache."""
        return self._store

    # Reads.

    async def get(self, key: str, default: Any = None) -> Any:
        """The value of `key`, or `default` on a miss.

        Args:
            key: the key.
            default: returned when the key is absent or expired. Default None; pass
                `MISSING` to tell a stored `None` from a miss.
        """
        peek = self._peek
        if peek is not None:
            value = peek(key)
            if value is not MISSING:
                return value
            if self._authoritative:
                return default
        data = await self._store.get(check_key(key))
        if data is None:
            return default
        return self._decode(key, data, default)

    async def mget(self, keys: Iterable[str]) -> list[Any]:
        """The values of `keys`, in order, None for each miss."""
        keys = check_keys(keys)
        peek = self._peek
        if peek is None:
            found = await self._store.mget(keys) if keys else []
            return [
                None if data is None else self._decode(k, data)
                for k, data in zip(keys, found, strict=True)
            ]
        values = [peek(key) for key in keys]
        if self._authoritative:
            return [None if value is MISSING else value for value in values]
        holes = [i for i, value in enumerate(values) if value is MISSING]
        if holes:
            found = await self._store.mget([keys[i] for i in holes])
            for i, data in zip(holes, found, strict=True):
                values[i] = MISSING if data is None else self._decode(keys[i], data, MISSING)
        return [None if value is MISSING else value for value in values]

    async def keys(self, pattern: str = "*") -> list[str]:
        """The live keys of this cache matching a Redis-style glob (`*`, `?`, `[a-z]`, `\\x`)."""
        if not isinstance(pattern, str):
            raise TypeError(f"pattern must be a string, got {pattern!r}")
        return await self._store.keys(pattern)

    async def ttl(self, key: str) -> float | None | Missing:
        """Seconds left before `key` expires; None if it never does; `MISSING` if there is no such key."""
        return await self._store.ttl(check_key(key))

    # Writes.

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store `value` under `key`.

        Args:
            key: the key.
            value: JSON-compatible data (dict with str keys, list, str, int, float, bool, None).
            ttl: seconds until it expires. Default: the cache's `ttl` (None: never).
        """
        data = self._encode(check_key(key), value)
        await self._store.set(key, data, self._ttl(ttl))

    async def mset(
        self, items: Mapping[str, Any] | Iterable[tuple[str, Any]], ttl: float | None = None
    ) -> None:
        """Store several values at once; nothing is written if one of them cannot be encoded.

        Args:
            items: a mapping or (key, value) pairs.
            ttl: seconds until they expire. Default: the cache's `ttl`.
        """
        pairs = items.items() if isinstance(items, Mapping) else items
        encoded = [(check_key(key), self._encode(key, value)) for key, value in pairs]
        if encoded:
            await self._store.mset(encoded, self._ttl(ttl))

    async def delete(self, key: str) -> None:
        """Remove `key` (no error if it is absent)."""
        await self._store.delete([check_key(key)])

    async def mdel(self, keys: Iterable[str]) -> None:
        """Remove several keys."""
        keys = check_keys(keys)
        if keys:
            await self._store.delete(keys)

    async def reset(self) -> None:
        """Remove every key of this cache's namespace; other caches and other data stay."""
        await self._store.reset()

    async def incr(self, key: str, ttl: float | None = None) -> int:
        """Add 1 to the integer at `key` (see `incrby`)."""
        return await self.incrby(key, 1, ttl)

    async def incrby(self, key: str, amount: int, ttl: float | None = None) -> int:
        """Add `amount` to the integer at `key` atomically (across instances on Redis); return the result.

        Args:
            key: the key; a missing key counts from 0.
            amount: the integer to add (may be negative).
            ttl: seconds until the key expires, set only when this call creates it.
                Default: the cache's `ttl`.
        """
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise TypeError(f"incrby amount must be an int, got {amount!r}")
        return await self._store.incrby(check_key(key), amount, self._ttl(ttl))

    # Object helpers: one field of a JSON object stored under a key.

    async def set_value_in_object(self, key: str, object_key: str, value: Any) -> None:
        """Set one field of the object at `key` (created if absent), atomically on Redis."""
        self._encode(check_key(key), value)  # fail before touching the store

        def change(old: bytes | None) -> bytes:
            obj = self._object(key, old)
            obj[object_key] = value
            return self._encode(key, obj)

        await self._store.update(key, change, self._ttl(None))

    async def get_value_in_object(self, key: str, object_key: str) -> Any:
        """One field of the object at `key`; None if the key or the field is absent."""
        value = await self.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise CacheError(self._not_object(key, value))
        return value.get(object_key)

    async def del_value_in_object(self, key: str, object_key: str) -> None:
        """Remove one field of the object at `key`, atomically on Redis."""

        def change(old: bytes | None) -> bytes | None:
            if old is None:
                return None
            obj = self._object(key, old)
            if object_key not in obj:
                return None
            del obj[object_key]
            return self._encode(key, obj)

        await self._store.update(check_key(key), change, self._ttl(None))

    # Read-through.

    async def wrap(
        self,
        key: str,
        fn: Compute,
        ttl: float | None = None,
        *,
        lock: bool = False,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> Any:
        """The value of `key`; on a miss, `fn()` computes it and it is stored.

        Concurrent misses for one key in this instance call `fn` once and share
        its result. If `fn` raises, nothing is stored and every waiter gets the
        error. A result of None is stored like any other value.

        Args:
            key: the key.
            fn: a plain or async callable without arguments.
            ttl: seconds the result is kept. Default: the cache's `ttl`.
            lock: also serialize the computation across the cluster through
                `app.lock_manager`: one instance computes, the others read its result.
            lock_ttl: the lock lease in seconds (renewed while `fn` runs). Default 30.
            lock_timeout: seconds to wait for the lock; then `LockAcquireError`. Default 30.
        """
        peek = self._peek
        if peek is not None:
            value = peek(key)
            if value is not MISSING:
                return value
        if peek is None or not self._authoritative:
            value = await self.get(key, MISSING)
            if value is not MISSING:
                return value
        locking = (lock_ttl, lock_timeout) if lock else None
        return await self._read_through.run(check_key(key), fn, self._ttl(ttl), None, locking)

    def lock_name(self, key: str) -> str:
        """The lock `wrap(key, ..., lock=True)` holds while it computes and stores `key`.

        Hold it (through `app.lock_manager`) around an invalidation of `key` so
        that a computation which read old data cannot store it after the delete.
        """
        return _keys.join("cache", self.prefix, check_key(key))

    async def wrap_with_condition(
        self,
        key: str,
        fn: Compute,
        *,
        use_cache: bool = True,
        is_cacheable: Predicate | None = None,
        ttl: float | None = None,
    ) -> Any:
        """Like `wrap`, but the result is stored only when it qualifies.

        Args:
            key: the key.
            fn: a plain or async callable without arguments.
            use_cache: False bypasses the cache entirely (no read, no write). Default True.
            is_cacheable: a plain or async predicate on the result; without one, a
                result is stored only if it is truthy (the reference's rule).
            ttl: seconds the result is kept. Default: the cache's `ttl`.
        """
        if not use_cache:
            return await call(fn)
        value = await self.get(key, MISSING)
        if value is not MISSING:
            return value
        predicate: Predicate = bool if is_cacheable is None else is_cacheable
        return await self._read_through.run(check_key(key), fn, self._ttl(ttl), predicate, None)

    # Lifecycle (driven by the CacheManager).

    async def connect(self) -> None:
        """Connect the store (the CacheManager calls this at start, or at creation after it)."""
        await self._store.connect()

    async def close(self) -> None:
        """Cancel computations in flight and close the store; later calls raise `StateError`."""
        store = self._detach()
        await store.close()

    async def abort(self) -> None:
        """Drop the store's connections as a crash would; later calls raise `StateError`."""
        store = self._detach()
        await store.abort()

    def _detach(self) -> CacheStore:
        store = self._store
        self._store = _ClosedStore(self.name)  # every call raises StateError
        self._peek = None
        self._authoritative = False
        self.__dict__.pop("get", None)  # back to Cache.get, which now raises StateError
        self._read_through.cancel()
        return store

    # Helpers.

    def _ttl(self, ttl: float | None) -> float | None:
        if ttl is None:
            return self.default_ttl
        return check_ttl(ttl, f"cache {self.name!r} ttl")

    def _encode(self, key: str, value: Any) -> bytes:
        try:
            return encode(value)
        except SerializationError:
            pass  # encode again below, this time naming the cache and the key
        what = f"cache {self.name!r}: the value for key {key!r}"
        try:
            return encode(value, what=what)
        except SerializationError as exc:
            detail = str(exc.__cause__)
            inner = detail.rpartition("not JSON serializable: ")[2]
            if inner == detail or inner == type(value).__name__:
                raise
            raise SerializationError(
                f"{what} is not JSON-compatible data (type {inner} inside a "
                f"{type(value).__name__}); convert it to dicts, lists, str, int, float, "
                "bool or None first"
            ) from exc.__cause__

    def _decode(self, key: str, data: bytes, default: Any = None) -> Any:
        try:
            return decode(data)
        except SerializationError:
            # Never unpickle or eval: a shared store must not be a code-execution path.
            self.log.warning(
                "cache %r: key %r holds %d bytes that are not JSON (written by another "
                "program?); treated as a miss",
                self.name,
                key,
                len(data),
            )
            return default

    def _object(self, key: str, old: bytes | None) -> dict[str, Any]:
        if old is None:
            return {}
        value = self._decode(key, old, MISSING)
        if value is MISSING:
            return {}
        if not isinstance(value, dict):
            raise CacheError(self._not_object(key, value))
        return value

    def _not_object(self, key: str, value: Any) -> str:
        return f"cache {self.name!r}: key {key!r} holds a {type(value).__name__}, not an object"


class _ClosedStore:
    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        async def closed(*args: Any, **kwargs: Any) -> Any:
            if attribute in ("close", "abort", "connect"):
                return None
            raise StateError(f"cache {self._name!r} is closed (the application has stopped)")

        return closed
