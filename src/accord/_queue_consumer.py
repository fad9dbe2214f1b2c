"""One channel's consumer: the claim loop, the concurrency cap, and each job's run."""

from __future__ import annotations

import asyncio
import enum
import inspect
import random
from typing import TYPE_CHECKING, Any

from ._codec import decode
from ._queue_types import (
    DEFAULT_BACKOFF,
    DEFAULT_BACKOFF_MAX,
    DEFAULT_MAX_RECOVERIES,
    IdleFunc,
    Job,
    JobContext,
    ProcessFunc,
)
from .exceptions import AccordError

if TYPE_CHECKING:
    from .event_queue import EventQueue

#: Jobs claimed per call when the consumer has no concurrency cap.
UNLIMITED_BATCH = 100
#: The longest a claim may wait for a job, so a stop is never held up for long.
MAX_CLAIM_WAIT = 1.0
MAX_ERROR_DELAY = 5.0
#: How long a stop waits for a cancelled job to end before giving up on it.
HARD_STOP = 5.0


class Phase(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    FINISHING = "finishing"


class Cancel(enum.Enum):
    TIMED_OUT = "timed out"
    LEASE_LOST = "lease lost"
    RELEASED = "released"


class Running:
    """A job claimed by this instance, from claim until its ack, retry or release."""

    __slots__ = ("cancel", "ctx", "job", "phase", "renewed_at", "task")

    def __init__(self, job: Job, now: float) -> None:
        self.job = job
        self.renewed_at = now
        self.phase = Phase.PENDING
        self.cancel: Cancel | None = None
        self.ctx: JobContext | None = None
        self.task: asyncio.Task[None] | None = None


def backoff_delay(failures: int, options: dict[str, Any]) -> float:
    """Seconds before retry number `failures`: exponential, capped, with equal jitter."""
    base = float(options.get("backoff", DEFAULT_BACKOFF))
    cap = float(options.get("backoff_max", DEFAULT_BACKOFF_MAX))
    delay: float = min(cap, base * 2 ** min(failures - 1, 62))
    return delay * random.uniform(0.5, 1.0)


class Consumer:
    """Claims jobs of one channel for this instance and runs them under the cap."""

    def __init__(
        self,
        queue: EventQueue,
        name: str,
        channel: str,
        process: ProcessFunc,
        idle: IdleFunc | None,
        concurrency: int,
        interval: float,
    ) -> None:
        self.queue = queue
        self.log = queue.app.log
        self.name = name
        self.channel = channel
        self.process = process
        self.idle = idle
        self.concurrency = concurrency
        self.interval = interval
        self.running: dict[str, Running] = {}
        self.subscribed = False
        self.stopping = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Consumer {self.name!r} {len(self.running)} running>"

    def free_slots(self) -> int:
        if self.concurrency <= 0:
            return UNLIMITED_BATCH
        return self.concurrency - len(self.running)

    def start(self) -> None:
        if self._task is None and not self.stopping:
            self._task = asyncio.create_task(self._loop(), name=f"accord-queue-{self.name}")

    # The claim loop.

    async def _loop(self) -> None:
        queue = self.queue
        adapter = queue.adapter
        consumer = queue.app.instance_id
        lease = queue.app.settings.queue_lease
        wait = min(self.interval, MAX_CLAIM_WAIT)
        error_delay = self.interval
        self.log.debug("queue %s: consumer started (concurrency %d)", self.name, self.concurrency)
        while not self.stopping:
            free = self.free_slots()
            if free <= 0:
                self._wake.clear()
                if self.free_slots() <= 0 and not self.stopping:
                    await self._wake.wait()
                continue
            if self.idle is not None and not await self._is_idle():
                await self._sleep(self.interval)
                continue
            try:
                jobs = await adapter.claim(self.name, consumer, free, lease, wait)
            except Exception as exc:
                self.log.warning(
                    "queue %s: claim failed: %s; retrying in %.1f s",
                    self.name,
                    exc,
                    error_delay,
                    exc_info=not isinstance(exc, AccordError),
                )
                await self._sleep(error_delay)
                error_delay = min(error_delay * 2, MAX_ERROR_DELAY)
                continue
            error_delay = self.interval
            if self.stopping and jobs:
                try:
                    await adapter.release(jobs)
                except AccordError as exc:
                    self.log.warning(
                        "queue %s: releasing %d job(s) claimed while stopping failed: %s; "
                        "they run again once their lease expires",
                        self.name,
                        len(jobs),
                        exc,
                    )
                break
            for job in jobs:
                self._launch(job)

    async def _is_idle(self) -> bool:
        assert self.idle is not None
        try:
            result = self.idle()
            if inspect.isawaitable(result):
                result = await result
        except Exception:
            self.log.exception("queue %s: idle() raised; treating it as busy", self.name)
            return False
        return bool(result)

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass

    def _launch(self, job: Job) -> None:
        record = Running(job, asyncio.get_running_loop().time())
        self.running[job.lease] = record
        self.queue.runtime.counters["claimed"] += 1
        record.task = asyncio.create_task(self._execute(record), name=f"accord-job-{job.id}")

    # One job.

    async def _execute(self, record: Running) -> None:
        job = record.job
        try:
            try:
                data = decode(job.body)
                payload, options = data["payload"], data.get("options") or {}
            except (AccordError, KeyError, TypeError) as exc:
                job.error = f"the job body cannot be decoded: {exc}"
                self.log.error("queue %s: job %s: %s; dead-lettered", self.name, job.id, job.error)
                await self._bury(job)
                return
            record.ctx = JobContext(job.id, self.channel, job.attempt, options, asyncio.Event())
            limit = options.get("max_recoveries", DEFAULT_MAX_RECOVERIES)
            if job.recoveries > limit:
                job.error = f"its worker died or stalled {job.recoveries} times while running it"
                self.log.error("queue %s: job %s: %s; dead-lettered", self.name, job.id, job.error)
                await self._bury(job)
                return
            error = await self._run(record, payload, options)
            if record.cancel is Cancel.LEASE_LOST:
                return
            if record.cancel is Cancel.RELEASED:
                job.attempt += 1
                await self.queue.adapter.release([job])
                self.queue.runtime.counters["released"] += 1
                return
            if error is None:
                await self._complete(job)
            else:
                await self._fail(job, options, error)
        except Exception as exc:
            self.log.error(
                "queue %s: job %s: %s; its lease will expire and it will run again",
                self.name,
                job.id,
                exc,
                exc_info=not isinstance(exc, AccordError),
            )
        finally:
            self.running.pop(job.lease, None)
            self._wake.set()

    async def _run(self, record: Running, payload: Any, options: dict[str, Any]) -> str | None:
        assert record.ctx is not None
        timeout = float(options.get("timeout") or 0)
        loop = asyncio.get_running_loop()
        timer = (
            loop.call_later(timeout, self.expire, record, Cancel.TIMED_OUT) if timeout > 0 else None
        )
        record.phase = Phase.RUNNING
        error: str | None = None
        try:
            await self.process(payload, record.ctx)
        except asyncio.CancelledError:
            if record.cancel is None:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            self.log.warning(
                "queue %s: job %s failed on delivery %d: %s",
                self.name,
                record.job.id,
                record.job.attempt + 1,
                error,
                exc_info=exc,
            )
        finally:
            record.phase = Phase.FINISHING
            if timer is not None:
                timer.cancel()
        if record.cancel is Cancel.TIMED_OUT:
            self.queue.runtime.counters["timed_out"] += 1
            self.log.warning(
                "queue %s: job %s timed out after %s s; cancelled",
                self.name,
                record.job.id,
                timeout,
            )
            return f"timed out after {timeout} s"
        return error

    def expire(self, record: Running, reason: Cancel) -> bool:
        """Cancel a running job: it timed out, lost its lease, or a stop cannot wait for it.

        Returns False if the job already returned (its acknowledgement decides).
        """
        if record.phase is Phase.FINISHING or record.cancel is not None:
            return False
        record.cancel = reason
        if record.ctx is not None:
            record.ctx.signal.set()
        if record.task is not None:
            record.task.cancel()
        return True

    async def _complete(self, job: Job) -> None:
        counters = self.queue.runtime.counters
        if await self.queue.runtime.ack(job):
            counters["completed"] += 1
            return
        counters["late_completions"] += 1
        self.log.warning(
            "queue %s: job %s finished after its lease was lost; the completion is rejected "
            "(another instance runs it)",
            self.name,
            job.id,
        )

    async def _fail(self, job: Job, options: dict[str, Any], error: str) -> None:
        counters = self.queue.runtime.counters
        counters["failed"] += 1
        job.failures += 1
        job.error = error
        max_retries = int(options.get("max_retries", 0))
        if job.failures <= max_retries:
            delay = backoff_delay(job.failures, options)
            job.attempt += 1
            if await self.queue.adapter.retry(job, delay):
                counters["retried"] += 1
                self.log.info(
                    "queue %s: job %s will be retried in %.2f s (retry %d of %d)",
                    self.name,
                    job.id,
                    delay,
                    job.failures,
                    max_retries,
                )
            else:
                counters["late_completions"] += 1
            return
        self.log.warning(
            "queue %s: job %s failed %d time(s); dead-lettered: %s",
            self.name,
            job.id,
            job.failures,
            error,
        )
        await self._bury(job)

    async def _bury(self, job: Job) -> None:
        counters = self.queue.runtime.counters
        if await self.queue.adapter.bury(job):
            counters["dead"] += 1
        else:
            counters["late_completions"] += 1

    # Stopping.

    async def stop_claiming(self) -> None:
        """Stop the claim loop; jobs already running go on."""
        self.stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), MAX_CLAIM_WAIT + HARD_STOP)
        except TimeoutError:
            self.log.warning("queue %s: claim did not return; cancelling it", self.name)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def drain(self, deadline: float) -> None:
        """Wait for running jobs until `deadline` (loop time), then cancel and release the rest."""
        loop = asyncio.get_running_loop()
        tasks = [r.task for r in self.running.values() if r.task is not None]
        if not tasks:
            return
        remaining = max(0.0, deadline - loop.time())
        self.log.info(
            "queue %s: waiting up to %.1f s for %d job(s) in flight",
            self.name,
            remaining,
            len(tasks),
        )
        _, pending = await asyncio.wait(tasks, timeout=remaining)
        if not pending:
            return
        self.log.warning(
            "queue %s: %d job(s) still running after the stop grace; cancelling and releasing them",
            self.name,
            len(pending),
        )
        for record in list(self.running.values()):
            self.expire(record, Cancel.RELEASED)
        _, stuck = await asyncio.wait(pending, timeout=HARD_STOP)
        for task in stuck:
            self.log.error(
                "queue %s: %s ignores cancellation; abandoning it", self.name, task.get_name()
            )

    async def stop(self, grace: float) -> None:
        await self.stop_claiming()
        await self.drain(asyncio.get_running_loop().time() + grace)

    async def abort(self) -> None:
        """Cancel the loop and every job without acknowledging or releasing anything."""
        self.stopping = True
        tasks = [r.task for r in self.running.values() if r.task is not None]
        for record in self.running.values():
            if record.ctx is not None:
                record.ctx.signal.set()
        if self._task is not None:
            tasks.append(self._task)
            self._task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
