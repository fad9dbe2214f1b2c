"""Multi-process checker: 3 processes x 10 coroutines, 5,000 run_exclusive calls around a racy update."""

from __future__ import annotations

import asyncio
import json
import os
from collections import defaultdict
from pathlib import Path

import asyncpg
import pytest
from lock_worker import spawn

from conftest import unique
from servers import ON_POSTGRES, ON_REDIS

PROCESSES = 3
COROUTINES = 10
CALLS = 5000
KEYS = [f"row:{n}" for n in range(5)]
WAIT = 150.0

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture(params=[ON_REDIS, ON_POSTGRES])
def lock_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(request.param)
    return url


@pytest.mark.timeout(240)
async def test_no_overlap_no_lost_update_and_rising_tokens(
    lock_url: str, postgres_url: str, tmp_path: Path
) -> None:
    connection = await asyncpg.connect(postgres_url)
    try:
        await connection.execute("CREATE TABLE counters (key text PRIMARY KEY, value int NOT NULL)")
        await connection.executemany("INSERT INTO counters VALUES ($1, 0)", [(k,) for k in KEYS])
    finally:
        await connection.close()

    name = unique("checker")
    shares = [CALLS // PROCESSES + (1 if i < CALLS % PROCESSES else 0) for i in range(PROCESSES)]
    workers = []
    for index, calls in enumerate(shares):
        storage = tmp_path / f"worker{index}"
        env = {
            **os.environ,
            "ACCORD_APP_NAME": name,
            "ACCORD_STORAGE": str(storage),
            "ACCORD_LOCK_URL": lock_url,
            "ACCORD_PUBSUB_URL": "memory://",
            "ACCORD_QUEUE_URL": "memory://",
        }
        options = {
            "db": postgres_url,
            "keys": KEYS,
            "calls": calls,
            "coroutines": COROUTINES,
            "out": str(tmp_path / f"holds{index}.json"),
        }
        workers.append(await spawn("checker", options, env))
    try:
        for worker in workers:
            assert worker.stdout is not None
            line = await asyncio.wait_for(worker.stdout.readline(), WAIT)
            assert json.loads(line)["event"] == "ready", line
        for worker in workers:  # start together, so they contend from the first call
            assert worker.stdin is not None
            worker.stdin.write(b"go\n")
            await worker.stdin.drain()
        outputs = await asyncio.wait_for(
            asyncio.gather(*(worker.communicate() for worker in workers)), WAIT
        )
    finally:
        for worker in workers:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, (out + err).decode()[-3000:]

    holds: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for index in range(PROCESSES):
        for key, acquired, released, token in json.loads(
            (tmp_path / f"holds{index}.json").read_text()
        ):
            holds[key].append((acquired, released, token))
    assert sum(len(h) for h in holds.values()) == CALLS

    connection = await asyncpg.connect(postgres_url)
    try:
        counters = dict(await connection.fetch("SELECT key, value FROM counters"))
    finally:
        await connection.close()

    overlaps = 0
    token_inversions = 0
    for key_holds in holds.values():
        key_holds.sort()
        for (_, released, token), (acquired, _, next_token) in zip(
            key_holds, key_holds[1:], strict=False
        ):
            overlaps += acquired <= released
            token_inversions += next_token <= token
    lost_updates = {key: len(holds[key]) - counters[key] for key in KEYS}
    assert overlaps == 0
    assert lost_updates == dict.fromkeys(KEYS, 0)
    assert token_inversions == 0
