"""PostgreSQL pub/sub: LISTEN/NOTIFY through asyncpg, with large payloads passed through a table."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import asyncpg

from ...config import redact
from ...exceptions import AdapterError, AdapterUnavailable, StateError
from .._link import LinkKeeper
from ._pool import connect, map_errors

if TYPE_CHECKING:
    from ...pubsub import PubSubListener

logger = logging.getLogger("accord.pubsub.postgres")

PUBLISH_TIMEOUT = 1.0
#: NOTIFY refuses payloads of 8000 bytes or more; bigger ones go through TABLE.
INLINE_LIMIT = 7900
TABLE = "accord_pubsub_payloads"
#: Seconds a large payload stays in TABLE; receivers fetch it within milliseconds.
RETENTION = 300.0
QUERY_TIMEOUT = 5.0
HEALTH_INTERVAL = 15.0
MAX_BATCH = 1000

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id bigserial PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload text NOT NULL
)"""
_NOTIFY_MANY = "SELECT count(pg_notify($1::text, p)) FROM unnest($2::text[]) AS p"
_NOTIFY_LARGE = f"""
WITH row AS (INSERT INTO {TABLE} (payload) VALUES ($3::text) RETURNING id)
SELECT pg_notify($1::text, $2::text || row.id::text) FROM row"""
_PRUNE = f"DELETE FROM {TABLE} WHERE created_at < now() - make_interval(secs => $1)"


def frame(kind: str, channel: str, body: str) -> str:
    """`i` (inline) or `t` (table row id), the channel's length, the channel, then the body."""
    return f"{kind}{len(channel)}:{channel}{body}"


def unframe(payload: str) -> tuple[str, str, str]:
    colon = payload.index(":")
    size = int(payload[1:colon])
    end = colon + 1 + size
    return payload[0], payload[colon + 1 : end], payload[end:]


class PostgresPubSubAdapter:
    """Pub/sub over PostgreSQL LISTEN/NOTIFY.

    Every channel of an application travels on one NOTIFY channel named after
    the app namespace and the URL's search_path; receivers filter by channel.
    Payloads of 7900 bytes or more are written to a table and NOTIFY carries
    the row id.

    Args:
        url: `postgresql://user@host:port/db`, optionally `?search_path=schema`
            (where the payload table lives).
        publish_timeout: seconds a publish may take before `AdapterUnavailable`. Default 1.
    """

    def __init__(self, url: str, *, publish_timeout: float = PUBLISH_TIMEOUT) -> None:
        self.url = url
        self.publish_timeout = publish_timeout
        self.notify_channel = ""
        self._listener: PubSubListener | None = None
        self._channels: set[str] = set()
        self._listen: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        # The LISTEN connection also runs the health check and large-payload reads,
        # and asyncpg runs one query at a time per connection.
        self._listen_lock = asyncio.Lock()
        self._publisher: asyncpg.Connection | None = None
        self._outbox: deque[tuple[str, str, asyncio.Future[None]]] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self._inbound: deque[tuple[str, str, str]] = deque()
        self._inbound_task: asyncio.Task[None] | None = None
        self._keeper = LinkKeeper(
            "PostgreSQL LISTEN", url, open=self._open, watch=self._watch, discard=self._discard
        )
        self._pruned_at = 0.0
        self._closed = False

    def __repr__(self) -> str:
        return f"<PostgresPubSubAdapter {redact(self.url)} {self.notify_channel}>"

    # Lifecycle.

    async def connect(self, listener: PubSubListener) -> None:
        if self._closed:
            raise StateError("this PostgreSQL pub/sub adapter is closed")
        self._listener = listener
        search_path = dict(parse_qsl(urlsplit(self.url).query)).get("search_path", "")
        digest = hashlib.blake2b(f"{listener.namespace}|{search_path}".encode(), digest_size=10)
        # NOTIFY channels are per database and at most 63 bytes: a digest of the
        # namespace and schema keeps apps and schemas apart within that limit.
        self.notify_channel = f"accord_{digest.hexdigest()}"
        try:
            publisher = await self._ensure_publisher()
            with map_errors(self.url):
                async with publisher.transaction():
                    # Instances starting together must not race on CREATE TABLE.
                    await publisher.execute("SELECT pg_advisory_xact_lock(hashtext($1))", TABLE)
                    await publisher.execute(_SCHEMA)
            await self._open()
        except BaseException:
            await self._stop(abort=True)
            raise
        self._keeper.start(listener)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._keeper.stop()
        if self._flusher is not None:
            await asyncio.wait({self._flusher}, timeout=self.publish_timeout)
        await self._stop(abort=False)

    async def abort(self) -> None:
        self._closed = True
        self._keeper.stop()
        await self._stop(abort=True)

    async def _stop(self, *, abort: bool) -> None:
        for task in (self._flusher, self._inbound_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        while self._outbox:
            waiter = self._outbox.popleft()[2]
            if not waiter.done():
                waiter.set_exception(AdapterUnavailable("the PostgreSQL pub/sub adapter is closed"))
        for connection in (self._listen, self._publisher):
            if connection is None:
                continue
            if abort:
                connection.terminate()
                continue
            try:
                await asyncio.wait_for(connection.close(), QUERY_TIMEOUT)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                connection.terminate()
        self._listen = self._publisher = None

    def is_connected(self) -> bool:
        return self._listen is not None and self._keeper.up

    # The LISTEN connection.

    async def _open(self) -> None:
        connection = await connect(self.url)
        try:
            with map_errors(self.url):
                connection.add_termination_listener(self._on_termination)
                await connection.add_listener(self.notify_channel, self._on_notify)
        except BaseException:
            connection.terminate()
            raise
        self._lost.clear()
        self._listen = connection

    def _on_termination(self, connection: asyncpg.Connection) -> None:
        if connection is self._listen:
            self._lost.set()

    async def _discard(self) -> None:
        dead, self._listen = self._listen, None
        if dead is not None:
            dead.terminate()

    async def _watch(self) -> None:
        """Return when the LISTEN connection is gone; a cheap query every interval finds dead peers."""
        while not self._closed:
            try:
                await asyncio.wait_for(self._lost.wait(), HEALTH_INTERVAL)
                return
            except TimeoutError:
                pass
            connection = self._listen
            if connection is None or connection.is_closed():
                return
            try:
                async with self._listen_lock:
                    await connection.fetchval("SELECT 1", timeout=QUERY_TIMEOUT)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                logger.warning(
                    "LISTEN connection on %s failed its health check: %s", self.notify_channel, exc
                )
                return

    def _on_notify(self, connection: Any, pid: int, notify_channel: str, payload: str) -> None:
        try:
            kind, channel, body = unframe(payload)
        except ValueError:
            logger.warning("dropped a malformed notification on %s", notify_channel)
            return
        if channel not in self._channels:
            return
        if kind == "i" and not self._inbound:
            self._deliver(channel, body)
            return
        # A table payload must be fetched first; what comes after it waits, to keep the order.
        self._inbound.append((kind, channel, body))
        if self._inbound_task is None:
            self._inbound_task = asyncio.get_running_loop().create_task(self._drain_inbound())

    async def _drain_inbound(self) -> None:
        try:
            while self._inbound:
                kind, channel, body = self._inbound[0]
                if kind == "t":
                    body = await self._fetch(channel, body)
                self._inbound.popleft()
                if body:
                    self._deliver(channel, body)
        finally:
            self._inbound_task = None

    async def _fetch(self, channel: str, row_id: str) -> str:
        connection = self._listen
        try:
            if connection is None:
                raise AdapterUnavailable("the LISTEN connection is down")
            with map_errors(self.url):
                async with self._listen_lock:
                    payload = await connection.fetchval(
                        f"SELECT payload FROM {TABLE} WHERE id = $1",
                        int(row_id),
                        timeout=QUERY_TIMEOUT,
                    )
        except (AdapterError, ValueError) as exc:
            logger.warning("could not fetch large message %s on %r: %s", row_id, channel, exc)
            return ""
        if payload is None:
            logger.warning("large message %s on %r expired before it was read", row_id, channel)
            return ""
        return str(payload)

    def _deliver(self, channel: str, body: str) -> None:
        if self._listener is not None:
            self._listener.deliver(channel, body.encode())

    # Subscriptions: one LISTEN carries every channel, so these only filter.

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    # Publishing.

    async def publish(self, channel: str, data: bytes) -> None:
        if self._closed:
            raise StateError(f"publish on {channel!r}: the PostgreSQL pub/sub adapter is closed")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._outbox.append((channel, data.decode(), waiter))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
        try:
            async with asyncio.timeout(self.publish_timeout):
                await waiter
        except TimeoutError:
            raise AdapterUnavailable(
                f"publish on {channel!r}: PostgreSQL at {redact(self.url)} did not answer "
                f"within {self.publish_timeout} s"
            ) from None

    async def _flush(self) -> None:
        # Concurrent publishes share one statement (one round trip), in order.
        try:
            while self._outbox:
                batch: list[tuple[str, str, asyncio.Future[None]]] = []
                while self._outbox and len(batch) < MAX_BATCH:
                    item = self._outbox.popleft()
                    if not item[2].done():  # its publisher gave up: never send it late
                        batch.append(item)
                if not batch:
                    continue
                try:
                    await self._send(batch)
                except AdapterError as exc:
                    logger.warning("publishing %d message(s) failed: %s", len(batch), exc)
                    if self._publisher is not None:
                        self._publisher.terminate()
                        self._publisher = None
                    for _, _, waiter in batch:
                        if not waiter.done():
                            waiter.set_exception(type(exc)(str(exc)))
                    continue
                for _, _, waiter in batch:
                    if not waiter.done():
                        waiter.set_result(None)
        finally:
            self._flusher = None

    async def _send(self, batch: list[tuple[str, str, asyncio.Future[None]]]) -> None:
        connection = await self._ensure_publisher()
        inline: list[str] = []
        with map_errors(self.url):
            for channel, text, _ in batch:
                payload = frame("i", channel, text)
                if len(payload.encode()) < INLINE_LIMIT:
                    inline.append(payload)
                    continue
                if inline:
                    await connection.fetchval(
                        _NOTIFY_MANY, self.notify_channel, inline, timeout=QUERY_TIMEOUT
                    )
                    inline = []
                await connection.fetchval(
                    _NOTIFY_LARGE,
                    self.notify_channel,
                    frame("t", channel, ""),
                    text,
                    timeout=QUERY_TIMEOUT,
                )
                await self._prune(connection)
            if inline:
                await connection.fetchval(
                    _NOTIFY_MANY, self.notify_channel, inline, timeout=QUERY_TIMEOUT
                )

    async def _prune(self, connection: asyncpg.Connection) -> None:
        now = time.monotonic()
        if now - self._pruned_at > RETENTION / 10:
            self._pruned_at = now
            await connection.execute(_PRUNE, RETENTION, timeout=QUERY_TIMEOUT)

    async def _ensure_publisher(self) -> asyncpg.Connection:
        if self._publisher is None or self._publisher.is_closed():
            self._publisher = await connect(self.url, timeout=self.publish_timeout)
        return self._publisher

    # Fault injection.

    async def sever(self) -> None:
        listen = self._listen
        if self._closed or listen is None:
            return

        async def kill() -> None:
            publisher = await self._ensure_publisher()
            with map_errors(self.url):
                await publisher.fetchval("SELECT pg_terminate_backend($1)", listen.get_server_pid())

        await self._keeper.sever(kill)

    async def restore(self) -> None:
        await self._keeper.restore()
