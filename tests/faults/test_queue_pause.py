"""Pause test: a worker stopped (SIGSTOP) longer than its lease loses its jobs and cannot complete them."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from queue_worker import Events, publisher_settings, spawn, wait_ready, worker_env

from accord.testing import cluster, wait_until
from servers import ON_POSTGRES, ON_RABBITMQ, ON_REDIS, shared_queue_url

LEASE = 2.0
JOB_MS = 1500
WAIT = 30.0

pytestmark = pytest.mark.slow


@pytest.fixture(params=[ON_REDIS, ON_POSTGRES, ON_RABBITMQ])
async def queue_url(request: pytest.FixtureRequest, app_name: str) -> AsyncIterator[str]:
    async with shared_queue_url(request, app_name) as url:
        yield url


@pytest.mark.timeout(120)
async def test_paused_worker_jobs_are_redelivered_and_its_late_completions_rejected(
    queue_url: str, app_name: str, tmp_path: Path
) -> None:
    log = tmp_path / "events.log"
    env = worker_env(
        queue_url,
        app_name,
        tmp_path / "workers",
        "pause",
        lease=LEASE,
        check_interval=0.3,
        concurrency=2,
    )
    settings = publisher_settings(queue_url, app_name, tmp_path / "publisher")
    async with cluster(1, settings=settings) as (publisher,):
        paused = await spawn(env, log, tmp_path / "paused.json")
        await wait_ready(log, paused.pid)
        ids = [await publisher.event_queue.publish("pause", {"ms": JOB_MS}) for _ in range(2)]
        await wait_until(lambda: len(Events.read(log).starts) == 2, WAIT)
        paused.send_signal(signal.SIGSTOP)
        survivor = await spawn(env, log, tmp_path / "survivor.json")
        try:
            await wait_ready(log, survivor.pid)

            def survivor_done() -> bool:
                done = Events.read(log).done
                return all(survivor.pid in done.get(job, []) for job in ids)

            await wait_until(survivor_done, WAIT)
        finally:
            paused.send_signal(signal.SIGCONT)
        # The paused worker wakes with both jobs overdue: they finish, or are cancelled
        # when the renewal finds the lease gone. Either way it must not acknowledge them.
        await asyncio.sleep(LEASE)
        for worker in (paused, survivor):
            worker.send_signal(signal.SIGTERM)
        await asyncio.gather(paused.wait(), survivor.wait())
        stats = await publisher.event_queue.stats("pause")

    events = Events.read(log)
    paused_counters = json.loads((tmp_path / "paused.json").read_text())
    survivor_counters = json.loads((tmp_path / "survivor.json").read_text())
    print(f"paused worker: {paused_counters}; survivor: {survivor_counters}")
    assert [runs[0][1] for runs in map(events.starts.get, ids)] == [paused.pid, paused.pid]
    assert all(events.starts[job][1] == (1, survivor.pid) for job in ids)
    assert survivor_counters.get("completed") == 2
    assert paused_counters.get("completed", 0) == 0
    rejected = paused_counters.get("late_completions", 0) + paused_counters.get("lease_lost", 0)
    assert rejected == 2
    assert paused_counters.get("late_completions", 0) >= 1
    assert (stats.queued, stats.delayed, stats.running, stats.dead) == (0, 0, 0, 0)
