"""Subscription: one handler on one channel, with its ordered mailbox and debounce timers."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson

from .types import MessageHandler

if TYPE_CHECKING:
    from .pubsub import Envelope

PREVIEW_CHARS = 120


class Subscription:
    """One handler on one channel: an ordered mailbox and its debounce timers."""

    __slots__ = ("channel", "debounce", "handler", "log", "active", "_mailbox", "_task", "_timers")

    def __init__(
        self,
        channel: str,
        handler: MessageHandler,
        debounce: float,
        log: logging.LoggerAdapter[Any],
    ) -> None:
        self.channel = channel
        self.handler = handler
        self.debounce = debounce
        self.log = log
        self.active = True
        self._mailbox: deque[Envelope] = deque()
        self._task: asyncio.Task[None] | None = None
        self._timers: dict[bytes, asyncio.TimerHandle] = {}

    def offer(self, envelope: Envelope) -> None:
        if not self.active:
            return
        if self.debounce <= 0:
            self._enqueue(envelope)
            return
        key = orjson.dumps(envelope.message, option=orjson.OPT_SORT_KEYS)
        if key in self._timers:
            return
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(self.debounce, self._fire, key, envelope)

    def _fire(self, key: bytes, envelope: Envelope) -> None:
        self._timers.pop(key, None)
        self._enqueue(envelope)

    def _enqueue(self, envelope: Envelope) -> None:
        if not self.active:
            return
        self._mailbox.append(envelope)
        if self._task is None:
            # One task drains the mailbox in order; it exits when the mailbox is empty.
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._mailbox and self.active:
                envelope = self._mailbox.popleft()
                try:
                    result = self.handler(envelope.message)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    self.log.exception(
                        "handler %s failed on channel %r, message %s (%s); the bus carries on",
                        _name(self.handler),
                        self.channel,
                        envelope.id,
                        _preview(envelope.message),
                    )
        finally:
            self._task = None

    def stop(self) -> None:
        """Drop pending debounced calls and queued messages; a running call finishes."""
        self.active = False
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._mailbox.clear()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task


def _name(handler: Any) -> str:
    return getattr(handler, "__qualname__", None) or repr(handler)


def _preview(message: Any) -> str:
    text = repr(message)
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "..."
