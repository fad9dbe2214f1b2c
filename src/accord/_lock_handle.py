"""The Lock handle, its lease renewal, and the hold that cancels a body whose lease is lost."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from .exceptions import AdapterError, LockAcquireError, LockLostError

if TYPE_CHECKING:
    from .locks import LockAdapter, LockManager

T = TypeVar("T")

#: A renewed lease is extended when a third of its ttl has passed.
RENEW_FRACTION = 1 / 3
#: The body is cancelled this share of the ttl before the lease would run out ...
MARGIN_FRACTION = 0.1
#: ... but never earlier than this many seconds before.
MAX_MARGIN = 1.0


class LockState(enum.Enum):
    """Where a `Lock` is in its life."""

    RESERVED = "reserved"  # taken by try_acquire; no lease asked for yet
    LEASED = "leased"  # held for `ttl` seconds, renewed or not
    RELEASED = "released"
    LOST = "lost"  # the lease ran out or was taken while held


class Lock:
    """A lock this instance holds: its key, fencing token and lease.

    `lock_manager.lock()` yields one; `acquire()` and `try_acquire()` return
    one. Calling it releases it (`await release()`), so the object returned
    by `acquire()` is the releaser.
    """

    def __init__(
        self,
        manager: LockManager,
        adapter: LockAdapter,
        key: str,
        name: str,
        owner: str,
        token: int,
        ttl: float,
        state: LockState,
        anchored_at: float,
    ) -> None:
        self.key = key
        self.owner = owner
        self.fencing_token = token
        self.ttl = ttl
        self.state = state
        self._manager = manager
        self._adapter = adapter
        self._name = name
        # Monotonic time by which the lease certainly still holds: measured
        # from before the request that set it was sent, so never too late.
        self._deadline = anchored_at + ttl
        self._epoch = 0  # bumped by each explicit extend
        self._renewal: _Renewal | None = None

    def __repr__(self) -> str:
        return f"<Lock {self.key!r} token={self.fencing_token} {self.state.value}>"

    @property
    def held(self) -> bool:
        """True while this handle holds the lock (reserved or leased)."""
        return self.state in (LockState.RESERVED, LockState.LEASED)

    def __call__(self) -> Awaitable[bool]:
        return self.release()

    async def release(self) -> bool:
        """Release the lock; True if it was still held, False otherwise (also on a second call)."""
        if not self.held:
            return False
        self._forget(LockState.RELEASED)
        try:
            released = await self._adapter.release(self._name, self.owner)
        except asyncio.CancelledError:
            # The request may not have reached the engine: release again in
            # the background (compare-and-delete, so a repeat is harmless).
            self._manager._release_later(self._adapter, self._name, self.owner)
            raise
        self._manager._log_debug("released lock %r (token %d)", self.key, self.fencing_token)
        return released

    async def extend(self, ttl: float | None = None) -> None:
        """Make the lease end `ttl` seconds from now.

        Args:
            ttl: seconds. Default: the lease's current ttl.

        Raises `LockAcquireError` when no lease is active: before `acquire(ttl)`
        on a reservation, after `release()`, or once the lease has run out.
        """
        ttl = self.ttl if ttl is None else _positive("ttl", ttl)
        if self.state is not LockState.LEASED:
            raise LockAcquireError(
                f"lock {self.key!r} has no active lease to extend ({self.state.value}); "
                "call acquire(ttl) on a reservation first"
            )
        if not await self._refresh(ttl):
            self._forget(LockState.LOST)
            raise LockAcquireError(
                f"the lease on lock {self.key!r} expired or was taken before it could be extended"
            )

    async def acquire(self, ttl: float = 0.5) -> Lock:
        """Turn this reservation into a lease of `ttl` seconds that is not renewed; returns self.

        Args:
            ttl: seconds until the lease ends unless extended or released. Default 0.5.

        Raises `LockLostError` if the reservation ran out and the lock was
        taken meanwhile, `LockAcquireError` if this handle was released.
        """
        ttl = _positive("ttl", ttl)
        if not self.held:
            raise LockAcquireError(
                f"lock {self.key!r} is {self.state.value}; take it again with try_acquire"
            )
        if not await self._refresh(ttl):
            self._forget(LockState.LOST)
            raise LockLostError(f"the reservation on lock {self.key!r} ran out before acquire()")
        self.state = LockState.LEASED
        return self

    async def run_exclusive(self, fn: Callable[[], Awaitable[T]], ttl: float = 30.0) -> T:
        """Run `fn` under this lock with a renewed lease of `ttl` seconds, then release it.

        Args:
            fn: an async function without arguments.
            ttl: seconds after which a crashed holder's lock frees itself. Default 30.

        If the lease is lost while `fn` runs, `fn` is cancelled and
        `LockLostError` is raised.
        """
        await self.acquire(ttl)
        async with _Hold(self):
            return await fn()

    async def _refresh(self, ttl: float) -> bool:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        if not await self._adapter.extend(self._name, self.owner, ttl):
            return False
        self.ttl = ttl
        self._deadline = sent + ttl
        self._epoch += 1
        if self._renewal is not None:
            self._renewal.reschedule()
        return True

    def _forget(self, state: LockState) -> None:
        self.state = state
        if self._renewal is not None:
            self._renewal.stop()
        self._manager._held.discard(self)


class _Renewal:
    """Extends a lease about every ttl/3 and cancels the holder's task once it is lost."""

    def __init__(self, lock: Lock, task: asyncio.Task[Any]) -> None:
        self.lock = lock
        self.task = task
        self.reason: str | None = None
        self._loop = asyncio.get_running_loop()
        self._runner: asyncio.Task[None] | None = None
        # A timer rather than a task: most bodies end before the first renewal.
        self._handle: asyncio.TimerHandle | None = None
        self._schedule_first()

    def _margin(self) -> float:
        return min(self.lock.ttl * MARGIN_FRACTION, MAX_MARGIN)

    def _schedule(self, when: float) -> None:
        self._handle = self._loop.call_at(when, self._due)

    def _schedule_first(self) -> None:
        # A third of the lease into it, counted from when the lease started.
        self._schedule(self.lock._deadline - self.lock.ttl * (1 - RENEW_FRACTION))

    def reschedule(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._schedule_first()

    def _due(self) -> None:
        self._handle = None
        if self._ran_out():
            return
        self._runner = self._loop.create_task(
            self._renew(), name=f"accord-lock-renewal:{self.lock.key}"
        )

    def _ran_out(self) -> bool:
        # Checked before any await: after a pause (SIGSTOP, a blocked loop) the
        # body must be cancelled before it gets a chance to run on.
        if self._loop.time() < self.lock._deadline - self._margin():
            return False
        self.lose(
            "its lease ran out before it could be renewed "
            "(a paused process or a blocked event loop)"
        )
        return True

    async def _renew(self) -> None:
        lock = self.lock
        ttl, epoch, sent = lock.ttl, lock._epoch, self._loop.time()
        retry = max(ttl / 20, 0.01)
        try:
            async with asyncio.timeout_at(lock._deadline - self._margin()):
                ok = await lock._adapter.extend(lock._name, lock.owner, ttl)
        except TimeoutError:
            self.lose("renewing its lease did not finish before the lease ran out")
            return
        except AdapterError as exc:
            lock._manager._log_warning(
                "renewing lock %r failed (%s); retrying in %.2f s", lock.key, exc, retry
            )
            self._runner = None
            self._schedule(self._loop.time() + retry)
            return
        except Exception as exc:
            # Not a server failure: a bug somewhere. Without renewal the body
            # cannot be trusted to hold the lock; stop it and say why.
            lock._manager.app.log.exception("renewing lock %r failed", lock.key)
            self.lose(f"renewal failed: {type(exc).__name__}: {exc}")
            return
        self._runner = None
        if not ok:
            self.lose("its lease expired or was taken by another holder")
            return
        deadline = sent + ttl
        # An explicit extend() may have raced this renewal; trust the earlier end.
        lock._deadline = deadline if epoch == lock._epoch else min(lock._deadline, deadline)
        self._schedule(sent + ttl * RENEW_FRACTION)

    def lose(self, reason: str) -> None:
        """Mark the lease lost and cancel the holder's task (once)."""
        if self.reason is not None:
            return
        self.reason = reason
        self.stop()
        lock = self.lock
        lock.state = LockState.LOST
        lock._manager._held.discard(lock)
        lock._manager._log_warning(
            "lock %r (token %d) lost: %s; cancelling its body", lock.key, lock.fencing_token, reason
        )
        self.task.cancel(f"lock {lock.key!r} lost: {reason}")

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._runner is not None and self._runner is not asyncio.current_task():
            self._runner.cancel()
            self._runner = None


class _Hold:
    """Renews a leased lock while the block runs; turns a lost lease into `LockLostError`."""

    def __init__(self, lock: Lock) -> None:
        self.lock = lock
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - asyncio always runs coroutines in a task
            raise RuntimeError("a lock must be held from inside an asyncio task")
        self.task = task
        self.cancelling = task.cancelling()

    async def __aenter__(self) -> Lock:
        self.renewal = self.lock._renewal = _Renewal(self.lock, self.task)
        return self.lock

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lock, renewal = self.lock, self.renewal
        renewal.stop()
        lock._renewal = None
        if renewal.reason is None:
            if lock.held:
                await self._release()
            return
        # The renewal cancelled this task; undo that cancellation unless
        # someone else cancelled it too, in which case CancelledError goes on.
        cancelled_too = self.task.uncancel() > self.cancelling
        await self._release_quietly()
        if cancelled_too and exc_type is asyncio.CancelledError:
            return
        raise LockLostError(
            f"lock {lock.key!r} was lost while its body ran: {renewal.reason}; "
            "the body was cancelled"
        ) from exc

    async def _release(self) -> None:
        try:
            await self.lock.release()
        except AdapterError as exc:
            # The lease frees itself after ttl; the body's own outcome matters more.
            self.lock._manager._log_warning(
                "releasing lock %r failed (%s); it frees itself within %.1f s",
                self.lock.key,
                exc,
                self.lock.ttl,
            )

    async def _release_quietly(self) -> None:
        lock = self.lock
        if lock._manager._adapter is None:
            return  # closed (it released what it held) or aborted (nothing is released)
        try:
            # Compare-and-delete: frees the key only if this owner still has it.
            await lock._adapter.release(lock._name, lock.owner)
        except AdapterError:
            pass
        except asyncio.CancelledError:
            lock._manager._release_later(lock._adapter, lock._name, lock.owner)
            raise


def _positive(what: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)
