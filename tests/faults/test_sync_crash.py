"""Crash after commit: 100 processes die between commit and relay; survivors deliver every message once."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from accord import Plugin, Settings
from accord.testing import cluster, wait_until
from conftest import unique

WORKER = Path(__file__).with_name("sync_crash_worker.py")
REPETITIONS = 100
CONCURRENCY = 4
WAIT = 90.0

pytestmark = [pytest.mark.redis, pytest.mark.slow]


class Crashing(Plugin):
    """The receiving side of the worker's plugin: counts each message."""

    name = "crashing"

    async def load(self) -> None:
        self.counts: Counter[int] = Counter()
        self.delays: list[float] = []

    async def handle_sync_message(self, message: Any) -> None:
        self.counts[message["n"]] += 1
        self.delays.append(time.time() - message["t"])


@pytest.mark.timeout(240)
async def test_messages_of_instances_killed_after_commit_are_delivered_once(
    redis_url: str, db_url: str, tmp_path: Path
) -> None:
    name = unique("crash")
    settings = Settings(
        app_name=name,
        storage=str(tmp_path),
        db_url=db_url,
        pubsub_url=redis_url,
        queue_url=f"memory://{name}",
        lock_url=f"memory://{name}",
    )
    async with cluster(2, plugins=[Crashing], settings=settings) as survivors:
        for app in survivors:
            app.sync_message_manager.outbox.sweep_interval = 0.25
        async with survivors[0].db.transaction() as tx:
            await tx.connection.execute(text("CREATE TABLE crash_items (n INTEGER)"))
        env = {
            **os.environ,
            "ACCORD_APP_NAME": name,
            "ACCORD_STORAGE": str(tmp_path),
            "ACCORD_DB_URL": db_url,
            "ACCORD_PUBSUB_URL": redis_url,
            "ACCORD_QUEUE_URL": "memory://",
            "ACCORD_LOCK_URL": "local",
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            str(REPETITIONS),
            str(CONCURRENCY),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), WAIT)
        assert process.returncode == 0, (out + err).decode()[-3000:]

        async with survivors[0].db.transaction() as tx:
            committed = (
                await tx.connection.execute(text("SELECT count(*) FROM crash_items"))
            ).scalar()
        assert committed == REPETITIONS

        counters = [app.plugins["crashing"].counts for app in survivors]  # type: ignore[attr-defined]
        expected = set(range(REPETITIONS))
        await wait_until(lambda: all(set(c) == expected for c in counters), WAIT)
        outbox = survivors[0].sync_message_manager.outbox
        await wait_until(lambda: _drained(outbox), WAIT)
        delays = sorted(survivors[1].plugins["crashing"].delays)  # type: ignore[attr-defined]
        print(
            f"commit -> handled by a survivor: median {delays[len(delays) // 2]:.2f} s, max {delays[-1]:.2f} s"
        )
        for counter in counters:
            lost = expected - set(counter)
            twice = [n for n, seen in counter.items() if seen > 1]
            assert (len(lost), twice) == (0, [])


async def _drained(outbox: Any) -> bool:
    return bool(await outbox.pending() == 0)
