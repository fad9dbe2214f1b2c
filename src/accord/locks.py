"""LockManager: cluster-wide locks with leases, renewal, lost-lease cancellation and fencing tokens."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeVar, runtime_checkable

from ._keys import join, unescape
from ._lock_handle import Lock, LockState, _Hold, _positive
from ._registry import load_adapter
from .exceptions import AdapterError, ConfigError, LockAcquireError, LockLostError, StateError

if TYPE_CHECKING:
    from .app import Application

__all__ = ["ADAPTERS", "Lock", "LockAdapter", "LockHolder", "LockManager", "LockState"]

T = TypeVar("T")

SETTING = "ACCORD_LOCK_URL"
DEFAULT_TTL = 30.0
LEASE_TTL = 0.5

ADAPTERS = {
    "local": "accord.adapters.memory.lock:LocalLockAdapter",
    "memory": "accord.adapters.memory.lock:LocalLockAdapter",
    "redis": "accord.adapters.redis.lock:RedisLockAdapter",
    "rediss": "accord.adapters.redis.lock:RedisLockAdapter",
    "postgresql": "accord.adapters.postgres.lock:PostgresLockAdapter",
    "postgres": "accord.adapters.postgres.lock:PostgresLockAdapter",
}


@dataclasses.dataclass(frozen=True, slots=True)
class LockHolder:
    """One lock held somewhere in the cluster, as `LockManager.holders()` lists it.

    Args:
        key: the lock's key, as passed to `lock()` (without the application's namespace).
        instance_id: the `Application.instance_id` of the instance that holds it.
        token: the holder's fencing token.
        expires_in: seconds left on the lease when it was read (> 0).
    """

    key: str
    instance_id: str
    token: int
    expires_in: float


@runtime_checkable
class LockAdapter(Protocol):
    """What a lock engine does: I/O only, in its own terms; `LockManager` owns the meaning.

    `key` is already namespaced by application and escaped; `owner` is unique
    per acquisition. Tokens must be strictly increasing per key, for ever.
    """

    async def connect(self) -> None: ...

    async def close(self) -> None:
        """Close connections; leases still held are left to expire."""

    async def abort(self) -> None:
        """Drop connections as a crash would."""

    async def acquire(
        self, key: str, owner: str, ttl: float, timeout: float | None = 0
    ) -> int | None:
        """Take `key` for `owner` for `ttl` seconds, waiting up to `timeout` (None: for ever).

        Returns the fencing token, or None if the key was still held when the
        timeout ran out (at once for timeout 0).
        """

    async def release(self, key: str, owner: str) -> bool:
        """Free `key` if `owner` holds it; False (and nothing freed) otherwise."""

    async def extend(self, key: str, owner: str, ttl: float) -> bool:
        """Make `owner`'s lease on `key` end `ttl` seconds from now; False if it is not held."""

    async def holders(self, prefix: str) -> list[tuple[str, str, int, float]]:
        """Every live lease whose key starts with `prefix`: (key, owner, token, seconds left > 0)."""


AdapterFactory: TypeAlias = Callable[[str], LockAdapter]
_ADAPTER_METHODS = ("connect", "close", "abort", "acquire", "release", "extend", "holders")


class ManagerState(enum.Enum):
    NEW = "new"
    STARTED = "started"
    CLOSED = "closed"


class LockManager:
    """Locks shared by every instance of the application, on the configured adapter.

    The adapter comes from `settings.lock_url` (`ACCORD_LOCK_URL`, else
    `ACCORD_CLUSTER_URL`, else `local`); it is created on first use and closed
    with the application.

    Args:
        app: the application whose name namespaces every key.
    """

    def __init__(self, app: Application) -> None:
        self.app = app
        self.state = ManagerState.NEW
        self._factories: dict[str, AdapterFactory | LockAdapter] = {}
        self._default: str | None = None
        self._adapter: LockAdapter | None = None
        self._opening = asyncio.Lock()
        self._held: set[Lock] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._waiting: dict[asyncio.Task[Any], int] = {}  # task -> its cancelling() count
        self._owners = itertools.count(1)

    def __repr__(self) -> str:
        return f"<LockManager {self.app.name!r} {self.state.value} held={len(self._held)}>"

    # Adapters.

    def register_adapter(
        self, name: str, factory: AdapterFactory | LockAdapter, *, default: bool = False
    ) -> None:
        """Make a lock adapter available under `name`.

        Args:
            name: the adapter's name; the built-in names are taken.
            factory: a callable taking the lock URL and returning a `LockAdapter`,
                or a ready adapter instance.
            default: use it instead of the one `lock_url` names. Default False.
                Register it before the first lock is taken (in a plugin's `load`).
        """
        if name in ADAPTERS or name in self._factories:
            raise ConfigError(f"a lock adapter named {name!r} is already registered")
        if default and self._adapter is not None:
            raise StateError(
                "the lock manager already uses an adapter; register the default "
                "one before the first lock is taken (in a plugin's load)"
            )
        self._factories[name] = factory
        if default:
            self._default = name

    def _factory(self) -> AdapterFactory | LockAdapter:
        if self._default is not None:
            return self._factories[self._default]
        url = self.app.settings.resolved_lock_url
        factory: AdapterFactory = load_adapter(ADAPTERS, url, setting=SETTING)
        return factory

    async def adapter(self) -> LockAdapter:
        """The adapter in use, created and connected on first call."""
        if self._adapter is not None:
            return self._adapter
        if self.state is ManagerState.CLOSED:
            raise StateError(f"the lock manager of {self.app.name!r} is closed")
        async with self._opening:
            if self._adapter is None:
                adapter = self._make(self._factory())
                try:
                    await adapter.connect()
                except BaseException:
                    # Half connected: drop what it opened; the next call tries again.
                    try:
                        await adapter.abort()
                    except Exception as exc:
                        self._log_debug("dropping a lock adapter that failed to connect: %s", exc)
                    raise
                self._adapter = adapter
            return self._adapter

    def _make(self, factory: AdapterFactory | LockAdapter) -> LockAdapter:
        if not isinstance(factory, type) and isinstance(factory, LockAdapter):
            return factory
        if not callable(factory):
            missing = [
                name for name in _ADAPTER_METHODS if not callable(getattr(factory, name, None))
            ]
            raise ConfigError(f"{factory!r} is not a LockAdapter (missing: {', '.join(missing)})")
        return factory(self.app.settings.resolved_lock_url)

    # Lifecycle.

    async def connect(self) -> None:
        """Check the configured adapter (a bad URL fails here); it connects on first use."""
        if self.state is ManagerState.CLOSED:
            raise StateError("a closed lock manager cannot be connected again")
        self._factory()
        self.state = ManagerState.STARTED

    async def close(self) -> None:
        """Stop waits, cancel bodies still holding a lock, release every lock held, close."""
        self.state = ManagerState.CLOSED
        self._stop_waits()
        for lock in list(self._held):
            if lock._renewal is not None:
                lock._renewal.lose("the lock manager closed")
            try:
                await asyncio.shield(lock._adapter.release(lock._name, lock.owner))
            except AdapterError as exc:
                self._log_warning("releasing lock %r at close failed: %s", lock.key, exc)
            lock._forget(LockState.RELEASED if lock.held else lock.state)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        adapter, self._adapter = self._adapter, None
        if adapter is not None:
            await adapter.close()

    async def abort(self) -> None:
        """Drop everything as a crash would: bodies cancelled, nothing released."""
        self.state = ManagerState.CLOSED
        self._stop_waits()
        for lock in list(self._held):
            if lock._renewal is not None:
                lock._renewal.lose("the application was aborted")
            lock._forget(LockState.LOST)
        for task in self._background:
            task.cancel()
        adapter, self._adapter = self._adapter, None
        if adapter is not None:
            await adapter.abort()

    def _stop_waits(self) -> None:
        # Calls still waiting for a lock end with StateError (see _take).
        for task in self._waiting:
            task.cancel("the lock manager closed")

    def _release_later(self, adapter: LockAdapter, name: str, owner: str) -> None:
        async def release() -> None:
            try:
                await adapter.release(name, owner)
            except Exception as exc:
                self._log_debug("late release of %r by %s failed: %s", name, owner, exc)

        task = asyncio.get_running_loop().create_task(release(), name=f"accord-lock-release:{name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def closed(self) -> bool:
        """True once the application stopped (or aborted) this manager."""
        return self.state is ManagerState.CLOSED

    @property
    def held(self) -> tuple[Lock, ...]:
        """The locks this instance holds right now."""
        return tuple(self._held)

    async def holders(self) -> list[LockHolder]:
        """Every lock of this application held right now, by any instance, sorted by key.

        A snapshot: a lease may end, or a new one begin, right after it is read.
        `held` gives this instance's own `Lock`s without asking the adapter.

        Example:
            for holder in await app.lock_manager.holders():
                print(holder.key, holder.instance_id, f"{holder.expires_in:.1f} s")
        """
        if self.state is ManagerState.CLOSED:
            raise StateError(f"the lock manager of {self.app.name!r} is closed")
        adapter = await self.adapter()
        prefix = join(self.app.name, "")
        found = []
        for name, owner, token, expires_in in await adapter.holders(prefix):
            key = unescape(name[len(prefix) :]) if name.startswith(prefix) else None
            if key is None or expires_in <= 0:
                continue
            # Owners are "<instance id>/<n>" (see _take); the id may hold a "/" itself.
            instance_id = owner.rpartition("/")[0]
            found.append(LockHolder(key, instance_id, int(token), expires_in))
        found.sort(key=lambda holder: holder.key)
        return found

    # Taking locks.

    async def _take(self, key: str, ttl: float, timeout: float | None, state: LockState) -> Lock:
        if not isinstance(key, str):
            raise TypeError(f"a lock key is a str, got {type(key).__name__}")
        ttl = _positive("ttl", ttl)
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0
        ):
            raise ValueError(f"timeout must be None or seconds >= 0, got {timeout!r}")
        if self.state is ManagerState.CLOSED:
            raise StateError(f"lock {key!r}: the lock manager of {self.app.name!r} is closed")
        adapter = await self.adapter()
        name = join(self.app.name, key)
        owner = f"{self.app.instance_id}/{next(self._owners)}"
        loop = asyncio.get_running_loop()
        sent = loop.time()
        task = asyncio.current_task()
        if task is not None:
            self._waiting[task] = task.cancelling()
        try:
            token = await adapter.acquire(name, owner, ttl, timeout)
        except BaseException as exc:
            # A cancelled or failed request may still have taken the key.
            self._release_later(adapter, name, owner)
            if (
                isinstance(exc, asyncio.CancelledError)
                and task is not None
                and self.closed
                and task.uncancel() <= self._waiting[task]
            ):
                raise StateError(
                    f"lock {key!r}: the lock manager of {self.app.name!r} closed while waiting"
                ) from None
            raise
        finally:
            if task is not None:
                self._waiting.pop(task, None)
        if token is None:
            if not timeout:
                raise LockAcquireError(f"lock {key!r} is held by another owner")
            raise LockAcquireError(f"lock {key!r} was not acquired within {timeout:g} s")
        lock = Lock(self, adapter, key, name, owner, token, ttl, state, sent)
        self._held.add(lock)
        self._log_debug("acquired lock %r (token %d, ttl %g s)", key, token, ttl)
        return lock

    def lock(
        self, key: str, ttl: float = DEFAULT_TTL, timeout: float | None = None
    ) -> _LockContext:
        """Hold `key` for the duration of an `async with` block, renewing the lease.

        Args:
            key: the lock's name, e.g. "fields:posts"; scoped to this application.
            ttl: seconds after which a crashed holder's lock frees itself. Default 30.
            timeout: seconds to wait for the lock; None waits for ever. Default None.

        Raises `LockAcquireError` if the timeout runs out, and `LockLostError`
        (after cancelling the block) if the lease is lost while it runs.

        Example:
            async with app.lock_manager.lock("fields:posts", ttl=10) as lock:
                await storage.write(data, fencing_token=lock.fencing_token)
        """
        return _LockContext(self, key, ttl, timeout)

    async def run_exclusive(
        self,
        key: str,
        fn: Callable[[], Awaitable[T]],
        ttl: float = DEFAULT_TTL,
        *,
        timeout: float | None = None,
    ) -> T:
        """Wait for the lock on `key`, run `fn` while holding it, release it, return `fn`'s result.

        Args:
            key: the lock's name; scoped to this application.
            fn: an async function without arguments.
            ttl: seconds after which a crashed holder's lock frees itself; the lease
                is renewed about every ttl/3 while `fn` runs. Default 30.
            timeout: seconds to wait for the lock; None waits for ever. Default None.

        The lock is released in every case. If the lease is lost while `fn`
        runs, `fn` is cancelled and `LockLostError` is raised.

        Example:
            result = await app.lock_manager.run_exclusive("fields:posts", drop_column, ttl=10)
        """
        async with self.lock(key, ttl=ttl, timeout=timeout):
            return await fn()

    async def acquire(
        self, key: str, ttl: float = LEASE_TTL, *, timeout: float | None = None
    ) -> Lock:
        """Wait for `key` and take a lease of `ttl` seconds that is NOT renewed.

        Args:
            key: the lock's name; scoped to this application.
            ttl: seconds after which the next waiter gets the lock. Default 0.5.
            timeout: seconds to wait; None waits for ever. Default None.

        Returns the `Lock`, which is also the releaser: `await release()`.
        """
        return await self._take(key, ttl, timeout, LockState.LEASED)

    async def try_acquire(self, key: str, timeout: float = 0, *, ttl: float = DEFAULT_TTL) -> Lock:
        """Take `key` now (or within `timeout`) and return a handle that holds it.

        Args:
            key: the lock's name; scoped to this application.
            timeout: seconds to wait; 0 fails at once if the key is held. Default 0.
            ttl: seconds the reservation lasts until `acquire(ttl)`, `run_exclusive`
                or `release()` is called on the handle. Default 30.

        Raises `LockAcquireError` if the key is held (after `timeout`).
        """
        return await self._take(key, ttl, timeout, LockState.RESERVED)

    # Logging (the app's logger prefixes the app and instance).

    def _log_debug(self, message: str, *args: Any) -> None:
        self.app.log.debug(message, *args)

    def _log_warning(self, message: str, *args: Any) -> None:
        self.app.log.warning(message, *args)


class _LockContext:
    """What `LockManager.lock()` returns: takes the lock on enter, renews it, releases on exit."""

    def __init__(self, manager: LockManager, key: str, ttl: float, timeout: float | None) -> None:
        self._manager = manager
        self._args = (key, ttl, timeout)
        self._hold: _Hold | None = None

    async def __aenter__(self) -> Lock:
        key, ttl, timeout = self._args
        loop = asyncio.get_running_loop()
        started = loop.time()
        lock = await self._manager._take(key, ttl, timeout, LockState.LEASED)
        if loop.time() - started > ttl / 3:
            # After a long wait the lease's start is unknown; restart it so the
            # renewal measures from a known time.
            try:
                await lock.extend(ttl)
            except LockAcquireError as exc:
                raise LockLostError(f"lock {key!r} was lost right after it was acquired") from exc
            except BaseException:
                lock._forget(LockState.RELEASED)
                self._manager._release_later(lock._adapter, lock._name, lock.owner)
                raise
        self._hold = _Hold(lock)
        return await self._hold.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> None:
        hold, self._hold = self._hold, None
        if hold is not None:
            await hold.__aexit__(*exc_info)
