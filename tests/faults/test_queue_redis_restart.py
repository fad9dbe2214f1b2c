"""Redis restart under a running consumer: queued jobs persist (AOF) and consumers resume."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from accord import AdapterUnavailable, Settings
from accord.event_queue import JobContext
from accord.testing import cluster, wait_until
from servers import RedisServer

WAIT = 30.0

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.mark.timeout(120)
async def test_queued_jobs_survive_a_redis_restart_and_consumers_resume(
    tmp_path: Path, app_name: str
) -> None:
    server = RedisServer(tmp_path / "redis", persistent=True)
    server.start()
    seen: list[Any] = []
    ready = True

    async def process(payload: Any, ctx: JobContext) -> None:
        seen.append(payload)

    settings = Settings(
        app_name=app_name,
        storage=str(tmp_path / "storage"),
        queue_url=server.url(),
        lock_url=f"memory://{app_name}",
        queue_lease=2.0,
        queue_check_interval=0.3,
    )
    try:
        async with cluster(1, settings=settings) as (app,):
            app.event_queue.subscribe("jobs", process=process, idle=lambda: ready, interval=0.05)
            for n in range(3):
                await app.event_queue.publish("jobs", n)
            await wait_until(lambda: len(seen) == 3, WAIT)
            ready = False
            await asyncio.sleep(0.2)
            for n in range(3, 6):
                await app.event_queue.publish("jobs", n, delay=0.5 if n == 5 else 0)
            server.stop()
            with pytest.raises(AdapterUnavailable):
                await app.event_queue.publish("jobs", "while down")
            # Claims fail and back off while the server is down.
            ready = True
            await asyncio.sleep(1.0)
            server.start()
            await wait_until(lambda: len(seen) == 6, WAIT)
            await app.event_queue.publish("jobs", 6)
            await wait_until(lambda: len(seen) == 7, WAIT)
            stats = await app.event_queue.stats("jobs")
    finally:
        server.kill()
    assert sorted(seen) == list(range(7))
    assert (stats.queued, stats.delayed, stats.running, stats.dead) == (0, 0, 0, 0)
