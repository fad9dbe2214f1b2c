"""PostgresLockAdapter: leases in a table, fencing tokens from a sequence, LISTEN/NOTIFY wake-ups."""

from __future__ import annotations

import asyncio
import hashlib
import logging

import asyncpg

from ..._keys import like_escape
from ...config import redact
from ...exceptions import StateError
from .._lock_waiters import Waiter, Waiters
from ._lock_wakeups import PostgresWakeups
from ._pool import create_pool, map_errors

__all__ = ["PostgresLockAdapter"]

logger = logging.getLogger("accord.locks.postgres")

#: Rows of keys free for this many seconds are deleted ...
SWEEP_AFTER = 600.0
#: ... by a sweep this often.
SWEEP_EVERY = 300.0
#: Seconds one statement may take before the server counts as unreachable.
COMMAND_TIMEOUT = 10.0

# A lease table rather than advisory locks: an advisory lock lives as long as
# the session that took it, so it has no TTL (a paused holder keeps it for
# ever), pins one connection per held lock, and carries no fencing token.
# Rows stay after release (owner NULL) so that a new token is always drawn
# under the row lock; the sweep removes rows that have been free for long.
SCHEMA = """
CREATE TABLE IF NOT EXISTS accord_locks (
    name text PRIMARY KEY,
    owner text,
    token bigint NOT NULL,
    expires_at timestamptz NOT NULL
) WITH (fillfactor = 70);
CREATE SEQUENCE IF NOT EXISTS accord_lock_fence;
"""

# Expiry uses the server's clock, shared by every instance. A sequence never
# goes backwards, also across a crash, so neither do tokens.
ACQUIRE = """
WITH attempt AS (
    INSERT INTO accord_locks AS held (name, owner, token, expires_at)
    VALUES ($1, $2, nextval('accord_lock_fence'), clock_timestamp() + make_interval(secs => $3))
    ON CONFLICT (name) DO UPDATE
        SET owner = excluded.owner,
            token = nextval('accord_lock_fence'),
            expires_at = clock_timestamp() + make_interval(secs => $3)
        WHERE held.expires_at <= clock_timestamp()
    RETURNING token
)
SELECT (SELECT token FROM attempt) AS token,
       (SELECT extract(epoch FROM expires_at - clock_timestamp())::float8
          FROM accord_locks WHERE name = $1) AS remaining
"""

RELEASE = """
WITH freed AS (
    UPDATE accord_locks SET owner = NULL, expires_at = clock_timestamp()
     WHERE name = $1 AND owner = $2 AND expires_at > clock_timestamp()
    RETURNING name
)
SELECT pg_notify('accord_lock_' || md5(name), '') FROM freed
"""

# Release straight to the next waiter of the same process, with a new token.
TRANSFER = """
UPDATE accord_locks
   SET owner = $3, token = nextval('accord_lock_fence'),
       expires_at = clock_timestamp() + make_interval(secs => $4)
 WHERE name = $1 AND owner = $2 AND expires_at > clock_timestamp()
RETURNING token
"""

EXTEND = """
UPDATE accord_locks SET expires_at = clock_timestamp() + make_interval(secs => $3)
 WHERE name = $1 AND owner = $2 AND expires_at > clock_timestamp()
"""

# Live leases under a prefix, with the time left on the server's clock.
HOLDERS = r"""
WITH now AS (SELECT clock_timestamp() AS at)
SELECT name, owner, token, extract(epoch FROM expires_at - now.at)::float8 AS remaining
  FROM accord_locks, now
 WHERE name LIKE $1 ESCAPE '\' AND owner IS NOT NULL AND expires_at > now.at
"""

SWEEP = """
DELETE FROM accord_locks
 WHERE owner IS NULL AND expires_at < clock_timestamp() - make_interval(secs => $1)
"""


class PostgresLockAdapter:
    """Locks in PostgreSQL: a lease row per key, waiters woken by NOTIFY.

    Args:
        url: `postgresql://` URL; `?search_path=schema` chooses where the table lives.
        pool: a ready asyncpg pool to use. Default: a pool of its own (1 to 10 connections).
    """

    def __init__(self, url: str, *, pool: asyncpg.Pool | None = None) -> None:
        self.url = url
        self._given = pool
        self._pool: asyncpg.Pool | None = pool
        self._waiters = Waiters()
        self._wakeups = PostgresWakeups(url, self._waiters)
        self._sweeper: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<PostgresLockAdapter {redact(self.url)!r}>"

    async def connect(self) -> None:
        if self._pool is None:
            self._pool = await create_pool(
                self.url, min_size=1, max_size=10, command_timeout=COMMAND_TIMEOUT
            )
        with map_errors(self.url):
            async with self._pool.acquire() as connection, connection.transaction():
                # Instances starting together would race on CREATE ... IF NOT EXISTS.
                await connection.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.accord_locks'))"
                )
                await connection.execute(SCHEMA)
        self._sweeper = asyncio.get_running_loop().create_task(
            self._sweep(), name="accord-lock-sweep"
        )

    async def close(self) -> None:
        await self._wakeups.close()
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
        pool, self._pool = self._pool, None
        if pool is not None and self._given is None:
            await pool.close()

    async def abort(self) -> None:
        pool = self._pool if self._given is None else None
        self._pool = None
        await self._wakeups.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if pool is not None:
            pool.terminate()

    def _ready(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StateError(f"{self!r} is not connected")
        return self._pool

    async def acquire(
        self, key: str, owner: str, ttl: float, timeout: float | None = 0
    ) -> int | None:
        pool = self._ready()
        args = (key, owner, float(ttl))

        async def attempt() -> tuple[int | None, float | None]:
            with map_errors(self.url):
                row = await pool.fetchrow(ACQUIRE, *args)
            if row["token"] is not None:
                return int(row["token"]), None
            remaining = row["remaining"]
            return None, (None if remaining is None else max(0.0, remaining))

        return await self._waiters.acquire(
            _digest(key), attempt, timeout, self._wakeups.listen, owner=owner, ttl=ttl, label=key
        )

    async def release(self, key: str, owner: str) -> bool:
        head = self._waiters.successor(_digest(key))
        if head is None:
            return await self._release(key, owner)
        # Shielded: once the key is handed over, the new owner must learn it.
        return await asyncio.shield(self._hand_over(key, owner, head))

    async def _release(self, key: str, owner: str) -> bool:
        with map_errors(self.url):
            rows = await self._ready().fetch(RELEASE, key, owner)
        return bool(rows)

    async def _hand_over(self, key: str, owner: str, head: Waiter) -> bool:
        with map_errors(self.url):
            token = await self._ready().fetchval(TRANSFER, key, owner, head.owner, float(head.ttl))
        if token is None:
            return False
        if not self._waiters.deliver(head, int(token)):
            # The waiter gave up meanwhile: free the key it was given.
            await self._release(key, head.owner)
        return True

    async def extend(self, key: str, owner: str, ttl: float) -> bool:
        with map_errors(self.url):
            status = await self._ready().execute(EXTEND, key, owner, float(ttl))
        return bool(status.endswith(" 1"))

    async def holders(self, prefix: str) -> list[tuple[str, str, int, float]]:
        with map_errors(self.url):
            rows = await self._ready().fetch(HOLDERS, like_escape(prefix) + "%")
        return [
            (row["name"], row["owner"], int(row["token"]), row["remaining"])
            for row in rows
            if row["remaining"] > 0
        ]

    async def _sweep(self) -> None:
        while True:
            try:
                with map_errors(self.url):
                    await self._ready().execute(SWEEP, SWEEP_AFTER)
            except Exception as exc:
                logger.warning("sweeping free lock rows failed: %s", exc)
            await asyncio.sleep(SWEEP_EVERY)


def _digest(key: str) -> str:
    """The key's md5, as the server computes `md5(name)`; it names the key's NOTIFY channel."""
    return hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()
