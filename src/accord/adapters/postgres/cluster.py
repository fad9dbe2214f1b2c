"""Membership in PostgreSQL: one row per instance, claimed with an upsert that respects live rows."""

from __future__ import annotations

from typing import Any

from ...cluster import InstanceInfo
from ._pool import create_pool, map_errors

SCHEMA = """
CREATE TABLE IF NOT EXISTS accord_instances (
    app text NOT NULL,
    id text NOT NULL,
    host text NOT NULL,
    pid integer NOT NULL,
    started_at double precision NOT NULL,
    last_beat double precision NOT NULL,
    PRIMARY KEY (app, id)
)
"""

# Insert, or take over a row whose instance stopped beating; a live row is left alone.
CLAIM = """
INSERT INTO accord_instances (app, id, host, pid, started_at, last_beat)
VALUES ($1, $2, $3, $4, $5, extract(epoch FROM clock_timestamp()))
ON CONFLICT (app, id) DO UPDATE
    SET host = excluded.host, pid = excluded.pid,
        started_at = excluded.started_at, last_beat = excluded.last_beat
    WHERE accord_instances.last_beat < extract(epoch FROM clock_timestamp()) - $6
RETURNING id
"""


class PostgresMembershipAdapter:
    """Membership for instances sharing one PostgreSQL server (server clock for beats)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: Any = None

    async def connect(self) -> None:
        self._pool = await create_pool(self.url, min_size=1, max_size=2)
        with map_errors(self.url):
            # Two instances creating the table at once can race in the catalog.
            async with self._pool.acquire() as connection:
                await connection.execute("SELECT pg_advisory_lock(hashtext('accord_instances'))")
                try:
                    await connection.execute(SCHEMA)
                finally:
                    await connection.execute(
                        "SELECT pg_advisory_unlock(hashtext('accord_instances'))"
                    )

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def claim(self, app: str, info: InstanceInfo, ttl: float) -> bool:
        with map_errors(self.url):
            row = await self._pool.fetchval(
                CLAIM, app, info.id, info.host, info.pid, info.started_at, ttl
            )
        return row is not None

    async def beat(self, app: str, info: InstanceInfo, ttl: float) -> bool:
        with map_errors(self.url):
            status = await self._pool.execute(
                "UPDATE accord_instances SET last_beat = extract(epoch FROM clock_timestamp()) "
                "WHERE app = $1 AND id = $2 "
                "AND last_beat >= extract(epoch FROM clock_timestamp()) - $3",
                app,
                info.id,
                ttl,
            )
        return bool(status == "UPDATE 1")

    async def leave(self, app: str, instance_id: str) -> None:
        with map_errors(self.url):
            await self._pool.execute(
                "DELETE FROM accord_instances WHERE app = $1 AND id = $2", app, instance_id
            )

    async def instances(self, app: str, ttl: float) -> list[InstanceInfo]:
        with map_errors(self.url):
            rows = await self._pool.fetch(
                "SELECT id, host, pid, started_at, last_beat FROM accord_instances "
                "WHERE app = $1 AND last_beat >= extract(epoch FROM clock_timestamp()) - $2 "
                "ORDER BY started_at",
                app,
                ttl,
            )
        return [InstanceInfo(**dict(row)) for row in rows]
