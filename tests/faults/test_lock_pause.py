"""SIGSTOP the holder for 3 x ttl: another process takes over, the holder's body is cancelled, fencing rejects it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from lock_worker import spawn

from conftest import unique
from servers import ON_POSTGRES, ON_REDIS

TTL = 1.0
PAUSE = 3 * TTL
WAIT = 60.0
KEY = "fenced:row"

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture(params=[ON_REDIS, ON_POSTGRES])
def lock_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(request.param)
    return url


class Worker:
    """One worker process and the JSON events it prints."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []

    async def next_event(self, expected: str) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), WAIT)
        if not line:
            stderr = await self.process.stderr.read() if self.process.stderr else b""
            pytest.fail(f"worker exited while {expected!r} was expected: {stderr.decode()[-3000:]}")
        event: dict[str, Any] = json.loads(line)
        self.events.append(event)
        assert event["event"] == expected, event
        return event


async def start(mode: str, options: dict[str, Any], env: dict[str, str]) -> Worker:
    return Worker(await spawn(mode, options, env))


@pytest.mark.timeout(180)
async def test_a_paused_holder_loses_its_lease_and_its_writes(
    lock_url: str, postgres_url: str, tmp_path: Path
) -> None:
    connection = await asyncpg.connect(postgres_url)
    try:
        await connection.execute(
            "CREATE TABLE fenced (key text PRIMARY KEY, token bigint NOT NULL, writer text)"
        )
        await connection.execute("INSERT INTO fenced VALUES ($1, 0, NULL)", KEY)
    finally:
        await connection.close()
    name = unique("pause")
    env = {
        **os.environ,
        "ACCORD_APP_NAME": name,
        "ACCORD_LOCK_URL": lock_url,
        "ACCORD_PUBSUB_URL": "memory://",
        "ACCORD_QUEUE_URL": "memory://",
    }
    options = {"db": postgres_url, "key": KEY, "ttl": TTL, "pool": 2}
    holder = await start("holder", options, {**env, "ACCORD_STORAGE": str(tmp_path / "holder")})
    contender: Worker | None = None
    try:
        holding = await holder.next_event("holding")
        assert holding["rows"] == 1
        contender = await start(
            "contender",
            {**options, "hold": PAUSE},
            {**env, "ACCORD_STORAGE": str(tmp_path / "contender")},
        )
        await contender.next_event("waiting")

        os.kill(holder.process.pid, signal.SIGSTOP)
        stopped_at = time.monotonic_ns()
        acquired = await contender.next_event("acquired")
        wrote = await contender.next_event("wrote")
        # Keep the holder stopped for 3 x ttl in all, then let it run again.
        await asyncio.sleep(max(0.0, PAUSE - (time.monotonic_ns() - stopped_at) / 1e9))
        resumed_at = time.monotonic_ns()
        os.kill(holder.process.pid, signal.SIGCONT)

        lost = await holder.next_event("lost")
        stale = await holder.next_event("stale_write")
        await contender.next_event("released")
        for worker in (holder, contender):
            await asyncio.wait_for(worker.process.wait(), WAIT)
            assert worker.process.returncode == 0
    finally:
        for worker in (holder, contender):
            if worker is not None and worker.process.returncode is None:
                os.kill(worker.process.pid, signal.SIGCONT)
                worker.process.kill()
                await worker.process.wait()

    # Another process got the lock after the lease expired, while the holder was stopped.
    assert stopped_at < acquired["at"] < resumed_at
    assert acquired["token"] > holding["token"]
    assert wrote["rows"] == 1
    # The resumed holder's body was cancelled with LockLostError ...
    assert "lost" in lost["message"] and lost["at"] > resumed_at
    assert not any(event["event"] == "finished" for event in holder.events)
    # ... and a write guarded by its stale token is rejected.
    assert stale["rows"] == 0
    connection = await asyncpg.connect(postgres_url)
    try:
        row = await connection.fetchrow("SELECT token, writer FROM fenced WHERE key = $1", KEY)
    finally:
        await connection.close()
    assert row is not None
    assert (row["token"], row["writer"]) == (acquired["token"], "contender")
