"""LinkKeeper: keeps an adapter's receiving connection up, reconnecting with backoff and reporting each change."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ..config import redact
from ..exceptions import AdapterError

if TYPE_CHECKING:
    from ..pubsub import PubSubListener

logger = logging.getLogger("accord.adapters.link")

RECONNECT_MIN = 0.05
RECONNECT_MAX = 2.0


class LinkKeeper:
    """Watches one receiving link; on loss reports it, reconnects with jittered backoff, reports the restore.

    Args:
        what: names the link in logs, e.g. "Redis subscriber".
        url: the server URL (logged without its password).
        open: opens and subscribes the link again; raises `AdapterError` on failure.
        watch: returns once the current link is lost.
        discard: releases what is left of a lost link.
    """

    def __init__(
        self,
        what: str,
        url: str,
        *,
        open: Callable[[], Awaitable[None]],
        watch: Callable[[], Awaitable[object]],
        discard: Callable[[], Awaitable[None]],
    ) -> None:
        self.what = what
        self.url = url
        self._open = open
        self._watch = watch
        self._discard = discard
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._held = False
        self._resume = asyncio.Event()
        self._resume.set()
        self._up = asyncio.Event()
        self._down = asyncio.Event()

    @property
    def up(self) -> bool:
        """Whether the link is up and its restoration (if any) has been reported."""
        return self._up.is_set()

    def start(self, listener: PubSubListener) -> None:
        """Start watching a link that `open` has just brought up."""
        self._up.set()
        self._task = asyncio.get_running_loop().create_task(self._run(listener))

    def stop(self) -> None:
        self._stopped = True
        self._resume.set()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        self._up.clear()

    async def _run(self, listener: PubSubListener) -> None:
        while not self._stopped:
            await self._watch()
            if self._stopped:
                return
            self._up.clear()
            await self._discard()
            await listener.connection_changed(False)
            self._down.set()
            await self._reconnect()
            if self._stopped:
                return
            self._down.clear()
            await listener.connection_changed(True)
            self._up.set()

    async def _reconnect(self) -> None:
        delay, attempts = RECONNECT_MIN, 0
        while not self._stopped:
            await self._resume.wait()
            if self._stopped:
                return
            try:
                await self._open()
                logger.info("%s link restored after %d attempt(s)", self.what, attempts + 1)
                return
            except AdapterError as exc:
                attempts += 1
                # The first failure and then every 20th are worth a warning; the rest is noise.
                level = logging.WARNING if attempts == 1 or attempts % 20 == 0 else logging.DEBUG
                logger.log(
                    level,
                    "%s at %s: reconnect attempt %d failed: %s",
                    self.what,
                    redact(self.url),
                    attempts,
                    exc,
                )
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, RECONNECT_MAX)

    async def sever(self, kill: Callable[[], Awaitable[None]]) -> None:
        """Hold reconnection, run `kill` to drop the link, and wait until the loss is reported."""
        if self._stopped or not self._up.is_set():
            return
        self._held = True
        self._resume.clear()
        await kill()
        await self._down.wait()

    async def restore(self) -> None:
        """Release a `sever` and wait until the link is restored and reported."""
        if not self._held:
            return
        self._held = False
        self._resume.set()
        await self._up.wait()
