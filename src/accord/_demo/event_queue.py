"""Demo step for the event queue: jobs spread over instances, retries, dead letters, crash recovery."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..config import Settings
from ..event_queue import JobContext
from ..testing import cluster, stop_abruptly, wait_until

WAIT = 15.0


async def run(say: Callable[[str], None]) -> None:
    with tempfile.TemporaryDirectory(prefix="accord-demo-queue-") as folder:
        bus = f"memory://demo-queue-{uuid.uuid4().hex[:8]}"
        settings = Settings(
            app_name="demo",
            storage=folder,
            pubsub_url=bus,
            queue_url=bus,
            lock_url=bus,
            # Short leases so a crashed instance's job moves on within a second.
            queue_lease=1.0,
            queue_check_interval=0.2,
        )
        async with cluster(3, settings=settings) as apps:
            names = {app.instance_id: f"instance {n}" for n, app in enumerate(apps, 1)}
            await _spread(say, apps, names)
            await _dead_letter(say, apps)
            await _crash(say, apps, names)


async def _spread(say: Callable[[str], None], apps: list[Any], names: dict[str, str]) -> None:
    ran: Counter[str] = Counter()

    def worker(instance: str) -> Callable[[Any, JobContext], Any]:
        async def thumbnail(payload: Any, ctx: JobContext) -> None:
            await asyncio.sleep(0.05)  # resizing an image
            ran[instance] += 1

        return thumbnail

    for app in apps:
        app.event_queue.subscribe("thumbnails", process=worker(names[app.instance_id]))
    for n in range(12):
        await apps[0].event_queue.publish("thumbnails", {"image": n})
    await wait_until(lambda: sum(ran.values()) == 12, WAIT)
    spread = ", ".join(f"{name} ran {ran[name]}" for name in names.values())
    say(f"instance 1 published 12 jobs; every instance subscribed (concurrency 1): {spread}")


async def _dead_letter(say: Callable[[str], None], apps: list[Any]) -> None:
    attempts: list[int] = []

    async def send_invoice(payload: Any, ctx: JobContext) -> None:
        attempts.append(ctx.retried)
        raise ConnectionError("the mail server refuses the connection")

    apps[1].event_queue.subscribe("invoices", process=send_invoice)
    await apps[0].event_queue.publish("invoices", {"invoice": 42}, max_retries=2, backoff=0.1)
    await wait_until(lambda: apps[1].event_queue.counters.get("dead") == 1, WAIT)
    say(
        f"a failing job with max_retries=2 ran {len(attempts)} times "
        f"(ctx.retried {attempts}), backing off about 0.1 s, then 0.2 s (with jitter)"
    )
    (dead,) = await apps[0].event_queue.dead_letters("invoices")
    say(
        f"then it went to the dead letters: {dead.payload} failed {dead.failures} times: {dead.error}"
    )
    say("event_queue.requeue(job_id) runs it again; event_queue.purge('invoices') drops them")


async def _crash(say: Callable[[str], None], apps: list[Any], names: dict[str, str]) -> None:
    runs: list[tuple[str, int]] = []
    finished: list[str] = []

    def worker(instance: str) -> Callable[[Any, JobContext], Any]:
        async def report(payload: Any, ctx: JobContext) -> None:
            runs.append((instance, ctx.retried))
            await asyncio.sleep(0.5)  # building a report
            finished.append(instance)

        return report

    apps[2].event_queue.subscribe("reports", process=worker(names[apps[2].instance_id]))
    await apps[0].event_queue.publish("reports", {"month": "2024-05"})
    await wait_until(lambda: bool(runs), WAIT)
    for app in apps[:2]:
        app.event_queue.subscribe("reports", process=worker(names[app.instance_id]))
    await stop_abruptly(apps[2])
    say(f"{runs[0][0]} started a report job, then crashed (stopped abruptly, nothing acknowledged)")
    await wait_until(lambda: bool(finished), WAIT)
    instance, retried = runs[-1]
    say(
        f"after its 1 s lease expired, {instance} ran the job again "
        f"(ctx.retried={retried}) and finished it: delivery is at least once"
    )
