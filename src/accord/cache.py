"""CacheManager and Cache: named caches over pluggable stores; the CacheStore protocol and STORES table."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from . import _keys
from ._cache_api import Cache
from ._cache_base import MISSING, Missing, check_ttl
from ._registry import load_adapter
from .exceptions import CacheNotFound, ConfigError, StateError

if TYPE_CHECKING:
    from .app import Application
    from .config import Settings

__all__ = ["MISSING", "STORES", "Cache", "CacheManager", "CacheStore", "Missing", "StoreFactory"]

STORES = {
    "memory": "accord.adapters.memory.cache:MemoryStore",
    "redis": "accord.adapters.redis.cache:RedisStore",
}

logger = logging.getLogger("accord.cache")


class CacheStore(Protocol):
    """What a cache store must do: keep JSON bytes under user keys, each with an optional TTL.

    A store belongs to one cache and owns its namespace: `key` arguments are
    the user's keys, unescaped, and `keys()` returns them the same way. TTLs
    are seconds (`None`: no expiry). The Cache encodes and decodes values;
    a store moves bytes. A store may also offer `peek(key)` (a synchronous
    lookup returning the decoded value or `MISSING`) with `authoritative =
    True` when a miss there is final; the Cache then skips the async call.
    Such a store may also offer `reader()`, returning an async `get(key,
    default)` with `Cache.get`'s contract, which the Cache binds as its `get`.
    """

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def abort(self) -> None:
        """Drop connections as a crash would."""

    async def get(self, key: str) -> bytes | None: ...

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set(self, key: str, data: bytes, ttl: float | None) -> None: ...

    async def mset(self, items: Sequence[tuple[str, bytes]], ttl: float | None) -> None: ...

    async def delete(self, keys: Sequence[str]) -> None: ...

    async def keys(self, pattern: str) -> list[str]:
        """Live keys matching a Redis-style glob (`*`, `?`, `[a-z]`, `\\` escapes)."""

    async def reset(self) -> None:
        """Delete every key of this store's namespace, and nothing else."""

    async def ttl(self, key: str) -> float | None | Missing: ...

    async def incrby(self, key: str, amount: int, ttl: float | None) -> int:
        """Add atomically; a new key starts at 0 and gets `ttl`; raise `CacheError` on a non-integer."""

    async def update(
        self, key: str, change: Callable[[bytes | None], bytes | None], ttl: float | None
    ) -> None:
        """Replace the value with `change(old)` atomically (None: no write); keep the TTL of an existing key."""


#: Builds a store: called with keyword arguments `namespace`, `settings` and the cache's store options.
StoreFactory = Callable[..., CacheStore]

# Options the Cache itself takes; the rest go to the store.
_CACHE_OPTIONS = frozenset({"ttl", "local", "local_max", "local_ttl"})


class _State(enum.Enum):
    NEW = "new"
    CONNECTED = "connected"
    CLOSED = "closed"


class CacheManager:
    """Creates and holds the application's named caches (`app.cache_manager`).

    Args:
        app: the application; its settings give the default store (`cache_store`)
            and the Redis URL (`resolved_cache_url`).

    Example:
        cache = await app.cache_manager.create_cache(name="auth", prefix="auth", store="redis")
        await cache.set("token:1", {"user": 1}, ttl=60)
    """

    def __init__(self, app: Application) -> None:
        from .app import AppLogger

        self.app = app
        self.log = AppLogger(logger, app.log.extra)
        self._factories: dict[str, StoreFactory | str] = dict(STORES)
        self._caches: dict[str, Cache] = {}
        self._opened: list[Cache] = []
        self._state = _State.NEW

    def __repr__(self) -> str:
        return f"<CacheManager {self.app.name!r} {len(self._caches)} cache(s) {self._state.value}>"

    @property
    def default(self) -> Cache:
        """The default cache, named after the application, on the default store.

        Created on first use without I/O, so plugins can use it from `load`.
        """
        cache = self._caches.get(self.app.name)
        if cache is None:
            cache = self._build(self.app.name, None, None, {})
        return cache

    @property
    def caches(self) -> Mapping[str, Cache]:
        """Name -> cache, for every cache currently registered."""
        return dict(self._caches)

    def register_store(self, name: str, factory: StoreFactory) -> None:
        """Make `store=name` available to `create_cache`.

        Args:
            name: the store name.
            factory: called as `factory(namespace=..., settings=..., **options)` for each
                cache; `namespace` is the escaped `<app>:<prefix>` the store must keep its keys under.
        """
        if not callable(factory):
            raise ConfigError(f"register_store({name!r}): the factory {factory!r} is not callable")
        self._factories[name] = factory

    async def create_cache(
        self,
        name: str,
        prefix: str | None = None,
        store: str | CacheStore | None = None,
        **options: Any,
    ) -> Cache:
        """Create the cache `name`, replacing any cache of that name (as the reference does).

        Args:
            name: the cache name (`get_cache(name)` finds it).
            prefix: the key namespace inside the app: keys live at `<app>:<prefix>:<key>`.
                Default: the name. Two caches with one prefix share their keys.
            store: a store name ("memory", "redis", or one registered) or a ready store.
                Default: the `cache_store` setting ("memory").
            **options: `ttl` (default seconds for writes; default None, no expiry),
                `local=True` (an in-process near cache in front of a shared store) with
                `local_max` (default 1000) and `local_ttl` (seconds, default 5); the
                rest go to the store: `max` (memory, default 2000), `url`, `fail_open`,
                `op_timeout` (redis).
        """
        if self._state is _State.CLOSED:
            raise StateError(f"create_cache({name!r}): the cache manager is closed")
        cache = self._build(name, prefix, store, options)
        if self._state is _State.CONNECTED:
            await cache.connect()
        return cache

    def get_cache(self, name: str) -> Cache:
        """The cache called `name`; `CacheNotFound` if none was created."""
        if name == self.app.name:
            return self.default
        try:
            return self._caches[name]
        except KeyError:
            known = ", ".join(sorted(self._caches)) or "none"
            raise CacheNotFound(f"no cache named {name!r} (caches: {known})") from None

    async def flush_all(self) -> None:
        """Reset every registered cache (each within its own namespace)."""
        for cache in list(self._caches.values()):
            await cache.reset()

    async def connect(self) -> None:
        """Connect every cache created so far (the app calls this at start)."""
        if self._state is not _State.NEW:
            return
        self.default  # noqa: B018 - a bad default store setting must fail at start
        for cache in list(self._opened):
            await cache.connect()
        self._state = _State.CONNECTED

    async def close(self) -> None:
        """Close every cache; using one afterwards raises `StateError`."""
        self._state = _State.CLOSED
        opened, self._opened = self._opened, []
        for cache in opened:
            try:
                await cache.close()
            except Exception:
                self.log.exception("closing cache %r failed", cache.name)

    async def abort(self) -> None:
        """Drop every store's connections as a crash would."""
        self._state = _State.CLOSED
        opened, self._opened = self._opened, []
        for cache in opened:
            await cache.abort()

    def _build(
        self, name: str, prefix: str | None, store: str | CacheStore | None, options: dict[str, Any]
    ) -> Cache:
        from ._cache_near import NearStore

        if self._state is _State.CLOSED:
            raise StateError(f"cache {name!r}: the cache manager is closed (the app has stopped)")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"create_cache: the name must be a non-empty string, got {name!r}")
        prefix = name if prefix is None else prefix
        if not isinstance(prefix, str):
            raise ConfigError(f"create_cache({name!r}): prefix must be a string, got {prefix!r}")
        cache_options = {key: options.pop(key) for key in _CACHE_OPTIONS & options.keys()}
        namespace = _keys.join(self.app.name, prefix)
        store_name = self.app.settings.cache_store if store is None else store
        if isinstance(store_name, str):
            backend = self._make_store(name, store_name, namespace, options)
        else:
            if options:
                raise ConfigError(
                    f"create_cache({name!r}): options {sorted(options)} need a store name, "
                    "not a ready store"
                )
            backend, store_name = store_name, type(store_name).__name__
        ttl = check_ttl(cache_options.get("ttl"), f"create_cache({name!r}) ttl")
        if cache_options.get("local"):
            if getattr(backend, "authoritative", False):
                raise ConfigError(
                    f"create_cache({name!r}): local=True puts an in-process cache in front of a "
                    f"shared store; store {store_name!r} is in-process already"
                )
            backend = NearStore(
                backend,
                app=self.app,
                log=self.log,
                prefix=prefix,
                max=cache_options.get("local_max", 1000),
                ttl=check_ttl(cache_options.get("local_ttl", 5.0), "local_ttl"),
            )
        cache = Cache(name, prefix, backend, app=self.app, log=self.log, ttl=ttl)
        self._caches[name] = cache
        self._opened.append(cache)
        self.log.debug("cache %r created on store %r (namespace %s)", name, store_name, namespace)
        return cache

    def _make_store(
        self, name: str, store: str, namespace: str, options: dict[str, Any]
    ) -> CacheStore:
        factory = self._factories.get(store)
        if factory is None:
            known = ", ".join(sorted(self._factories))
            raise ConfigError(
                f"create_cache({name!r}): unknown store {store!r}; use one of: {known} "
                "(or cache_manager.register_store)"
            )
        if isinstance(factory, str):
            factory = load_adapter({store: factory}, store, setting=f"create_cache({name!r}) store")
        settings: Settings = self.app.settings
        try:
            return factory(namespace=namespace, settings=settings, **options)
        except TypeError as exc:
            raise ConfigError(
                f"create_cache({name!r}): store {store!r} does not accept these options "
                f"{sorted(options)}: {exc}"
            ) from exc
