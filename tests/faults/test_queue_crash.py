"""Crash test: 3 worker processes, 2,000 jobs, one worker killed (-9) every 2 s and restarted."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from queue_worker import Events, publisher_settings, spawn, wait_ready, worker_env

from accord.testing import cluster
from servers import ON_POSTGRES, ON_RABBITMQ, ON_REDIS, shared_queue_url

JOBS = 2000
WORKERS = 3
CONCURRENCY = 4
KILL_EVERY = 2.0
LEASE = 2.0
CHECK_INTERVAL = 0.5
WAIT = 150.0

pytestmark = pytest.mark.slow


@pytest.fixture(params=[ON_REDIS, ON_POSTGRES, ON_RABBITMQ])
async def queue_url(request: pytest.FixtureRequest, app_name: str) -> AsyncIterator[str]:
    async with shared_queue_url(request, app_name) as url:
        yield url


@pytest.mark.timeout(300)
async def test_jobs_survive_workers_killed_every_two_seconds(
    queue_url: str, app_name: str, tmp_path: Path
) -> None:
    log = tmp_path / "events.log"
    env = worker_env(
        queue_url,
        app_name,
        tmp_path / "workers",
        "crash",
        lease=LEASE,
        check_interval=CHECK_INTERVAL,
        concurrency=CONCURRENCY,
        ACCORD_STOP_GRACE="5",
    )
    settings = publisher_settings(queue_url, app_name, tmp_path / "publisher")
    loop = asyncio.get_running_loop()
    async with cluster(1, settings=settings) as (publisher,):
        ids: list[str] = []
        for start in range(0, JOBS, 200):
            ids += await asyncio.gather(
                *(
                    publisher.event_queue.publish("crash", {"ms": 20 + (n * 37) % 81})
                    for n in range(start, start + 200)
                )
            )
        workers = [await spawn(env, log, tmp_path / f"counters-{i}.json") for i in range(WORKERS)]
        for worker in workers:
            await wait_ready(log, worker.pid)
        killed: list[int] = []
        deadline = loop.time() + WAIT
        while len(Events.read(log).done) < JOBS:
            assert loop.time() < deadline, f"only {len(Events.read(log).done)} of {JOBS} done"
            await asyncio.sleep(KILL_EVERY)
            if len(Events.read(log).done) >= JOBS:
                break
            slot = len(killed) % WORKERS
            victim = workers[slot]
            victim.send_signal(signal.SIGKILL)
            await victim.wait()
            killed.append(victim.pid)
            workers[slot] = await spawn(env, log, tmp_path / f"counters-r{len(killed)}.json")
        for worker in workers:
            if worker.returncode is None:
                worker.send_signal(signal.SIGTERM)
        await asyncio.gather(*(worker.wait() for worker in workers))
        stats = await publisher.event_queue.stats("crash")

    events = Events.read(log)
    in_flight = {pid: events.unfinished(pid) for pid in killed}
    interrupted = set().union(*in_flight.values())
    summary = (
        f"{len(killed)} kills; jobs running at the kills: {sum(map(len, in_flight.values()))}; "
        f"duplicate runs: {events.duplicate_runs()}; "
        f"duplicate completions: {events.duplicate_completions()}"
    )
    print(summary)
    assert len(killed) >= 3, summary
    assert set(events.done) == set(ids), f"{len(set(ids) - set(events.done))} jobs lost"
    # Every job running in a killed worker ran again, elsewhere or after the restart.
    assert all(len(events.starts[job]) >= 2 for job in interrupted)
    assert events.redeliveries_unmarked() == []
    # A worker holds at most CONCURRENCY jobs between claim and acknowledgement, so
    # only those can run twice: the ones running at the kill, and the ones that had
    # returned but were not yet acknowledged.
    assert events.duplicate_runs() <= len(killed) * CONCURRENCY, summary
    assert events.duplicate_completions() <= events.duplicate_runs()
    assert (stats.queued, stats.delayed, stats.running, stats.dead) == (0, 0, 0, 0)
