"""One timer that bounds many calls sharing a timeout, instead of a timer (or a task) per call."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class _Call:
    __slots__ = ("cancelling", "deadline", "done", "expired", "task")

    def __init__(self, deadline: float, task: asyncio.Task[object]) -> None:
        self.deadline = deadline
        self.task = task
        self.cancelling = task.cancelling()
        self.done = False
        self.expired = False


class Watchdog:
    """Cancels calls that outlive `timeout` seconds; `run` turns that into `TimeoutError`.

    Every call has the same timeout, so deadlines come in order: a queue and
    one timer for its head do the work of `asyncio.timeout` per call, whose
    timer handles pile up in the event loop at thousands of calls a second.

    Args:
        timeout: seconds a call may take.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._calls: deque[_Call] = deque()
        self._timer: asyncio.TimerHandle | None = None

    async def run(self, call: Awaitable[T]) -> T:
        """Await `call`; `TimeoutError` if it takes longer than `timeout`."""
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - asyncio always runs coroutines in a task
            return await call
        loop = asyncio.get_running_loop()
        calls = self._calls
        while calls and calls[0].done:
            calls.popleft()
        entry = _Call(loop.time() + self.timeout, task)
        calls.append(entry)
        if self._timer is None:
            self._timer = loop.call_at(entry.deadline, self._expire)
        try:
            return await call
        except asyncio.CancelledError:
            # Ours alone: a cancellation from elsewhere still propagates.
            if entry.expired and task.uncancel() <= entry.cancelling:
                raise TimeoutError(f"no answer within {self.timeout:g} s") from None
            raise
        finally:
            entry.done = True

    def _expire(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        calls = self._calls
        while calls:
            entry = calls[0]
            if not entry.done:
                if entry.deadline > now:
                    break
                entry.expired = True
                entry.task.cancel()
            calls.popleft()
        if calls:
            self._timer = asyncio.get_running_loop().call_at(calls[0].deadline, self._expire)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
