"""SyncMessageManager: per-plugin messages sent after commit through the outbox, de-duplicated and replayed."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any

from . import _codec
from ._outbox import Outbox, map_db_errors
from .exceptions import AdapterUnavailable, StateError
from .types import MessageHandler

if TYPE_CHECKING:
    from .app import Application
    from .db import Transaction

__all__ = ["CHANNEL_PREFIX", "OUTBOX_KIND", "SyncMessageManager"]

#: Pub/sub channel of a plugin's sync messages: `sync.<plugin name>`.
CHANNEL_PREFIX = "sync."
#: The outbox kind of sync messages.
OUTBOX_KIND = "sync"
#: Message ids each instance remembers to drop duplicates.
DEDUP_SIZE = 50_000
#: Seconds before a reported link loss that a replay also covers: a silent
#: link is noticed only after its health check fails (up to 30 s on Redis),
#: and instances' clocks differ.
REPLAY_MARGIN = 60.0

logger = logging.getLogger("accord.sync_messages")


class _State(enum.Enum):
    NEW = "new"
    CONNECTED = "connected"
    CLOSED = "closed"


class SyncMessageManager:
    """Tells the other instances of a plugin that its state changed, once the change is committed.

    Each message is written to the outbox table (in the caller's transaction
    when one is given), published on the pub/sub channel `sync.<plugin name>`
    right after the commit, and published by a surviving instance if the
    sender crashed in between. Receivers drop duplicates by message id. An
    instance whose pub/sub link was lost replays what it missed from the
    outbox table once the link is back; if it cannot, the plugins'
    `on_resync()` hook runs.

    Args:
        app: the application.

    Example:
        async with app.db.transaction() as tx:
            await tx.connection.execute(posts.update().values(title="new"))
            await app.sync_message_manager.publish("posts", {"type": "reload"}, transaction=tx)
    """

    def __init__(self, app: Application) -> None:
        self.app = app
        self.outbox = Outbox(app)
        self.outbox.register(OUTBOX_KIND, self._send)
        self.replay_margin = REPLAY_MARGIN
        self.log = type(app.log)(logger, app.log.extra)
        #: Messages dropped because this instance had handled them already.
        self.duplicates_dropped = 0
        #: Messages handled only thanks to a replay after a lost link.
        self.recovered = 0
        self._state = _State.NEW
        self._handlers: dict[str, list[MessageHandler]] = {}
        self._dispatchers: dict[str, MessageHandler] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lost_at: float | None = None
        self._publish_down = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._created_at = time.time()
        app.on("pubsub:lost", self._on_lost)
        app.on("pubsub:restored", self._on_restored)

    def __repr__(self) -> str:
        return f"<SyncMessageManager {self._state.value} channels={sorted(self._handlers)}>"

    @property
    def channels(self) -> frozenset[str]:
        """The channels (plugin names) this instance handles sync messages for."""
        return frozenset(self._handlers)

    # Lifecycle.

    async def connect(self) -> None:
        """Create the outbox table, send what was committed before, start the recovery sweep."""
        if self._state is _State.CLOSED:
            raise StateError("the sync message manager is closed; create a new Application")
        if self._state is _State.CONNECTED:
            return
        await self.outbox.connect()
        self._state = _State.CONNECTED
        if self._handlers:
            # A message published between this instance's `load` (which read
            # the database) and its subscription taking effect was missed.
            self._spawn(self._catch_up(self._created_at, "started"))

    async def close(self) -> None:
        """Stop sending; rows not sent yet are left to the other instances."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        await self._cancel_tasks()
        await self.outbox.close()

    async def abort(self) -> None:
        """Stop at once, as a crash would."""
        self._state = _State.CLOSED
        await self._cancel_tasks()
        await self.outbox.abort()

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # Subscribing and publishing.

    async def subscribe(self, channel: str, handler: MessageHandler) -> None:
        """Call `handler(message)` for each sync message sent on `channel` by another instance.

        Args:
            channel: the plugin name; the pub/sub channel is `sync.<channel>`.
            handler: an async callable taking the message. Subscribing it twice delivers once.
        """
        handlers = self._handlers.setdefault(channel, [])
        if handler in handlers:
            return
        handlers.append(handler)
        if channel not in self._dispatchers:
            dispatcher = partial(self._dispatch, channel)
            self._dispatchers[channel] = dispatcher
            await self.app.pub_sub_manager.subscribe(CHANNEL_PREFIX + channel, dispatcher)

    async def unsubscribe(self, channel: str, handler: MessageHandler) -> None:
        """Stop calling `handler` for `channel`; an unknown handler is ignored.

        Args:
            channel: the plugin name.
            handler: the handler given to `subscribe`.
        """
        handlers = self._handlers.get(channel, [])
        if handler not in handlers:
            return
        handlers.remove(handler)
        if not handlers:
            del self._handlers[channel]
            dispatcher = self._dispatchers.pop(channel)
            await self.app.pub_sub_manager.unsubscribe(CHANNEL_PREFIX + channel, dispatcher)

    async def publish(
        self,
        channel: str,
        message: Any,
        *,
        transaction: Transaction | None = None,
        skip_self: bool = True,
        only_self: bool = False,
    ) -> None:
        """Send `message` to the handlers of `channel` on the instances, after commit.

        Without a transaction the message is written to the outbox in a
        transaction of its own (or in the one already open in this task, which
        it then joins) and published when that commits, before this returns.

        Args:
            channel: the plugin name.
            message: JSON-compatible data; anything else raises `SerializationError` here.
            transaction: publish only after it commits; drop the message at
                once if it rolls back. Default: none.
            skip_self: this instance does not receive it. Default True.
            only_self: only this instance receives it (nothing is written or
                published). Default False.
        """
        if self._state is _State.CLOSED:
            raise StateError(f"sync message on {channel!r}: the application is stopping")
        if transaction is not None and not transaction.active:
            raise StateError(
                f"sync message on {channel!r}: the transaction has already {transaction.state}"
            )
        data = _codec.encode(message, what=f"sync message on {channel!r}")
        if only_self:
            payload = {"id": uuid.uuid4().hex, "skip_self": False, "message": _codec.decode(data)}
            deliver = partial(self._dispatch, channel, payload)
            if transaction is None:
                await deliver()
            else:
                transaction.after_commit(deliver)
            return
        record = {
            "channel": channel,
            "origin": self.app.instance_id,
            "skip_self": skip_self,
            "message": message,
        }
        if transaction is not None:
            await self.outbox.add(transaction, OUTBOX_KIND, record)
            return
        with map_db_errors(f"sync message on {channel!r}"):
            async with self.app.db.transaction() as tx:
                await self.outbox.add(tx, OUTBOX_KIND, record)

    async def _send(self, row_id: str, record: dict[str, Any]) -> None:
        # The outbox sender: runs on the committing instance right after
        # commit, or on any instance for a row its writer left unsent.
        if self._publish_down:
            raise AdapterUnavailable("the pub/sub link is down; the message waits in the outbox")
        origin = record.get("origin")
        skip_self = bool(record.get("skip_self", True))
        payload = {
            "id": row_id,
            "origin": origin,
            "skip_self": skip_self,
            "message": record.get("message"),
        }
        try:
            # Another instance's row must reach this instance too: pub/sub's
            # skip_self knows only who publishes, the payload knows who wrote it.
            await self.app.pub_sub_manager.publish(
                CHANNEL_PREFIX + str(record["channel"]),
                payload,
                skip_self=skip_self and origin == self.app.instance_id,
            )
        except AdapterUnavailable:
            if self._lost_at is not None:
                self._publish_down = True
            raise

    # Receiving.

    async def _dispatch(self, channel: str, payload: Any) -> None:
        await self._receive(channel, payload)

    async def _receive(self, channel: str, payload: Any) -> bool:
        if not isinstance(payload, dict) or not isinstance(payload.get("id"), str):
            self.log.warning(
                "dropped a message on sync channel %r that is not a sync message", channel
            )
            return False
        message_id = payload["id"]
        if payload.get("skip_self", True) and payload.get("origin") == self.app.instance_id:
            return False
        if message_id in self._seen:
            self.duplicates_dropped += 1
            self.log.debug("sync message %s on %r already handled; dropped", message_id, channel)
            return False
        self._seen[message_id] = None
        if len(self._seen) > DEDUP_SIZE:
            self._seen.popitem(last=False)
        for handler in list(self._handlers.get(channel, ())):
            try:
                await handler(payload.get("message"))
            except Exception:
                self.log.exception(
                    "sync message handler %s failed on %r, message %s",
                    getattr(handler, "__qualname__", handler),
                    channel,
                    message_id,
                )
        return True

    # Link loss and replay.

    def _on_lost(self, *args: Any, **kwargs: Any) -> None:
        if self._lost_at is None:
            self._lost_at = time.time()
            self.log.warning("pub/sub link lost; sync messages sent meanwhile will be replayed")

    def _on_restored(self, *args: Any, **kwargs: Any) -> None:
        lost_at = self._lost_at if self._lost_at is not None else time.time()
        self._lost_at = None
        self._publish_down = False
        if self._state is _State.CLOSED:
            return
        since = max(lost_at - self.replay_margin, self._created_at)
        self._spawn(self._catch_up(since, f"pub/sub link back after {time.time() - lost_at:.1f} s"))
        self.outbox.wake()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine, name="accord-sync-replay")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _catch_up(self, since: float, why: str) -> None:
        # Handles, from the outbox table, every message sent since `since` that
        # this instance has not handled yet; what it has handled is dropped as a duplicate.
        if time.time() - since >= self.outbox.retention:
            await self._resync(f"{why}; the outbox no longer keeps all messages since then")
            return
        seen = fresh = 0
        try:
            async for row_id, record in self.outbox.replay(OUTBOX_KIND, since):
                channel = record.get("channel")
                if not isinstance(channel, str) or channel not in self._handlers:
                    continue
                seen += 1
                payload = {key: record.get(key) for key in ("origin", "skip_self", "message")}
                payload["id"] = row_id
                if await self._receive(channel, payload):
                    fresh += 1
                    self.recovered += 1
        except Exception as exc:
            await self._resync(f"{why}; the outbox could not be read ({type(exc).__name__}: {exc})")
            return
        self.log.log(
            logging.INFO if fresh else logging.DEBUG,
            "%s: replayed %d sync message(s) from the outbox, %d had been missed",
            why,
            seen,
            fresh,
        )

    async def _resync(self, reason: str) -> None:
        channels = sorted(self._handlers)
        self.log.warning("sync messages may have been missed (%s); resyncing %s", reason, channels)
        for channel in channels:
            plugin = self.app.plugins.get(channel)
            if plugin is None:
                continue
            try:
                await plugin.on_resync()
            except Exception:
                self.log.exception("plugin %r failed in on_resync", channel)
        try:
            await self.app.emit("sync:resync", channels)
        except Exception:
            self.log.exception("a handler of the sync:resync event failed")
