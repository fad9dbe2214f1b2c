"""The event queue's per-instance machinery: batched acks, lease renewal, lease recovery."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from ._queue_consumer import Cancel, Consumer, Running
from .exceptions import AccordError

if TYPE_CHECKING:
    from ._queue_types import Job
    from .event_queue import EventQueue

#: Renew a running job's lease once a third of it has passed.
RENEW_FRACTION = 1 / 3


class Runtime:
    """Background work shared by every consumer of one `EventQueue`."""

    def __init__(self, queue: EventQueue) -> None:
        self.queue = queue
        self.log = queue.app.log
        self.counters: Counter[str] = Counter()
        self._acks: list[tuple[Job, asyncio.Future[bool]]] = []
        self._ack_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._renew_loop(), name="accord-queue-renew"),
            asyncio.create_task(self._recover_loop(), name="accord-queue-recover"),
        ]

    async def start_consumer(self, consumer: Consumer) -> None:
        queue = self.queue
        await queue.adapter.subscribe(consumer.name, queue.app.instance_id, consumer.concurrency)
        consumer.subscribed = True
        if consumer in queue.consumers and not consumer.stopping:
            consumer.start()

    def spawn(self, coroutine: Coroutine[Any, Any, None], what: str) -> None:
        async def guarded() -> None:
            try:
                await coroutine
            except AccordError as exc:
                self.log.error("%s failed: %s", what, exc)

        task = asyncio.create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def shutdown(self, grace: float) -> None:
        """Stop claiming, wait for running jobs until `grace` seconds pass, release the rest."""
        deadline = asyncio.get_running_loop().time() + grace
        consumers = self.queue.consumers
        await asyncio.gather(*(c.stop_claiming() for c in consumers))
        await asyncio.gather(*(c.drain(deadline) for c in consumers))
        await self._cancel_background()
        await self._cancel_loops()
        if self._ack_task is not None:
            await asyncio.gather(self._ack_task, return_exceptions=True)
        for consumer in consumers:
            if not consumer.subscribed:
                continue
            try:
                await self.queue.adapter.unsubscribe(consumer.name, self.queue.app.instance_id)
            except AccordError as exc:
                self.log.warning("queue %s: unsubscribe failed: %s", consumer.name, exc)

    async def crash(self) -> None:
        """Cancel everything without acknowledging or releasing anything."""
        await self._cancel_background()
        await asyncio.gather(*(c.abort() for c in self.queue.consumers), return_exceptions=True)
        await self._cancel_loops()
        if self._ack_task is not None:
            self._ack_task.cancel()
            await asyncio.gather(self._ack_task, return_exceptions=True)
        for _, future in self._acks:
            future.cancel()
        self._acks = []

    async def _cancel_background(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _cancel_loops(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # Acknowledgements: jobs that finish together are acknowledged in one call.

    async def ack(self, job: Job) -> bool:
        """Acknowledge `job`; False if its lease was lost. Batched with other jobs finishing now."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._acks.append((job, future))
        if self._ack_task is None:
            self._ack_task = asyncio.create_task(self._flush_acks(), name="accord-queue-ack")
        return await future

    async def _flush_acks(self) -> None:
        adapter = self.queue.adapter
        try:
            while self._acks:
                batch, self._acks = self._acks, []
                try:
                    results = await adapter.ack([job for job, _ in batch])
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), ok in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(ok)
        finally:
            self._ack_task = None

    # Lease renewal: a long job is never redelivered while this instance lives.

    async def _renew_loop(self) -> None:
        lease = self.queue.app.settings.queue_lease
        period = lease * RENEW_FRACTION
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period / 2)
            now = loop.time()
            due: list[tuple[Consumer, Running]] = [
                (consumer, record)
                for consumer in self.queue.consumers
                for record in list(consumer.running.values())
                if now - record.renewed_at >= period and record.cancel is None
            ]
            if not due:
                continue
            try:
                results = await self.queue.adapter.renew([r.job for _, r in due], lease)
            except AccordError as exc:
                self.log.warning("queue: renewing %d lease(s) failed: %s", len(due), exc)
                continue
            for (consumer, record), ok in zip(due, results, strict=True):
                if ok:
                    record.renewed_at = now
                    continue
                if not consumer.expire(record, Cancel.LEASE_LOST):
                    continue
                self.counters["lease_lost"] += 1
                self.log.warning(
                    "queue %s: job %s lost its lease (this instance stalled for more than "
                    "%.1f s); cancelled, another instance runs it",
                    consumer.name,
                    record.job.id,
                    lease,
                )

    # Recovery: jobs whose instance died go back to the queue once their lease expires.

    async def _recover_loop(self) -> None:
        settings = self.queue.app.settings
        while True:
            for consumer in self.queue.consumers:
                if not consumer.subscribed:
                    continue
                try:
                    count = await self.queue.adapter.recover(consumer.name, settings.queue_lease)
                except AccordError as exc:
                    self.log.warning(
                        "queue %s: recovering expired leases failed: %s", consumer.name, exc
                    )
                    continue
                if count:
                    self.counters["recovered"] += count
                    self.log.info(
                        "queue %s: %d job(s) whose lease expired are queued again",
                        consumer.name,
                        count,
                    )
            await asyncio.sleep(settings.queue_check_interval * random.uniform(0.8, 1.2))
