"""The in-process queue adapter: the reference for every engine, saved to disk on a graceful stop."""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from ...event_queue import Job, QueueStats
from ...exceptions import QueueError, StateError

logger = logging.getLogger("accord.queue.memory")

FORMAT_VERSION = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


class _Channel:
    __slots__ = ("dead", "heap", "ids", "leased", "waiters")

    def __init__(self) -> None:
        # (due on the monotonic clock, sequence, job): FIFO among equal due times.
        self.heap: list[tuple[float, int, Job]] = []
        self.leased: dict[str, tuple[Job, float]] = {}
        self.dead: dict[str, Job] = {}
        self.ids: set[str] = set()
        self.waiters: set[asyncio.Future[None]] = set()


class _Bus:
    """The jobs of one `memory://name`, shared by every Application of the process using it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.users = 0
        self.channels: dict[str, _Channel] = {}
        self.sequence = itertools.count()

    def channel(self, name: str) -> _Channel:
        channel = self.channels.get(name)
        if channel is None:
            channel = self.channels[name] = _Channel()
        return channel

    def push(self, channel: _Channel, job: Job, due: float) -> None:
        heapq.heappush(channel.heap, (due, next(self.sequence), job))
        for waiter in list(channel.waiters):
            if not waiter.done():
                try:
                    waiter.set_result(None)
                except RuntimeError:  # the waiter's event loop is closed
                    channel.waiters.discard(waiter)


_BUSES: dict[str, _Bus] = {}


def _copy(job: Job, **changes: Any) -> Job:
    return dataclasses.replace(job, **changes)


class MemoryQueueAdapter:
    """Jobs in this process, shared by name (`memory://name`) between Applications.

    What is still queued (and the dead letters) is written to
    `<storage>/event_queue/<name>.json` when the last Application using the
    name stops gracefully, and read back when the first one connects. A crash
    loses what was in memory, as it would for any in-process state.

    Args:
        url: `memory://` (the process-wide default) or `memory://name`.
        storage: the application's storage folder.
    """

    def __init__(self, url: str, *, storage: Path | str = "./storage") -> None:
        self.name = url.partition("://")[2].strip("/")
        self.path = (
            Path(storage) / "event_queue" / f"{_UNSAFE.sub('_', self.name) or 'default'}.json"
        )
        self._bus: _Bus | None = None

    def __repr__(self) -> str:
        return f"<MemoryQueueAdapter memory://{self.name}>"

    @property
    def bus(self) -> _Bus:
        if self._bus is None:
            raise StateError(f"memory://{self.name} queue is not connected; the job is not stored")
        return self._bus

    async def connect(self) -> None:
        bus = _BUSES.get(self.name)
        if bus is None:
            bus = _BUSES[self.name] = _Bus(self.name)
            self._load(bus)
        bus.users += 1
        self._bus = bus

    async def close(self) -> None:
        bus = self._detach()
        if bus is not None and bus.users == 0:
            self._save(bus)

    async def abort(self) -> None:
        self._detach()

    def _detach(self) -> _Bus | None:
        bus, self._bus = self._bus, None
        if bus is None:
            return None
        bus.users -= 1
        if bus.users == 0 and _BUSES.get(self.name) is bus:
            del _BUSES[self.name]
        return bus

    async def subscribe(self, channel: str, consumer: str, concurrency: int) -> None:
        self.bus.channel(channel)

    async def unsubscribe(self, channel: str, consumer: str) -> None:
        pass

    async def enqueue(self, job: Job, delay: float) -> bool:
        bus = self.bus
        channel = bus.channel(job.channel)
        if job.id in channel.ids:
            return False
        channel.ids.add(job.id)
        bus.push(channel, _copy(job, lease=""), time.monotonic() + delay)
        return True

    async def claim(
        self, channel: str, consumer: str, count: int, lease: float, wait: float
    ) -> list[Job]:
        bus = self.bus
        state = bus.channel(channel)
        jobs = self._take(state, consumer, count, lease)
        if jobs or wait <= 0:
            return jobs
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + wait
        while not jobs:
            now = time.monotonic()
            if now >= deadline:
                break
            timeout = deadline - now
            if state.heap:
                timeout = min(timeout, max(0.0, state.heap[0][0] - now))
            waiter: asyncio.Future[None] = loop.create_future()
            state.waiters.add(waiter)
            timer = loop.call_later(timeout, _resolve, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                state.waiters.discard(waiter)
            if self._bus is not bus:
                return []
            jobs = self._take(state, consumer, count, lease)
        return jobs

    def _take(self, state: _Channel, consumer: str, count: int, lease: float) -> list[Job]:
        now = time.monotonic()
        jobs: list[Job] = []
        while state.heap and len(jobs) < count and state.heap[0][0] <= now:
            _, number, job = heapq.heappop(state.heap)
            claimed = _copy(job, lease=f"{consumer}#{number}")
            state.leased[claimed.lease] = (claimed, now + lease)
            jobs.append(_copy(claimed))
        return jobs

    async def ack(self, jobs: Sequence[Job]) -> list[bool]:
        results = []
        for job in jobs:
            state = self.bus.channel(job.channel)
            held = state.leased.pop(job.lease, None) is not None
            if held:
                state.ids.discard(job.id)
            results.append(held)
        return results

    async def renew(self, jobs: Sequence[Job], lease: float) -> list[bool]:
        results = []
        now = time.monotonic()
        for job in jobs:
            state = self.bus.channel(job.channel)
            entry = state.leased.get(job.lease)
            if entry is not None:
                state.leased[job.lease] = (entry[0], now + lease)
            results.append(entry is not None)
        return results

    async def retry(self, job: Job, delay: float) -> bool:
        bus = self.bus
        state = bus.channel(job.channel)
        if state.leased.pop(job.lease, None) is None:
            return False
        bus.push(state, _copy(job, lease=""), time.monotonic() + delay)
        return True

    async def release(self, jobs: Sequence[Job]) -> None:
        bus = self.bus
        for job in jobs:
            state = bus.channel(job.channel)
            if state.leased.pop(job.lease, None) is not None:
                # Due at time zero: released jobs go before everything already due.
                bus.push(state, _copy(job, lease=""), 0.0)

    async def bury(self, job: Job) -> bool:
        state = self.bus.channel(job.channel)
        if state.leased.pop(job.lease, None) is None:
            return False
        state.ids.discard(job.id)
        state.dead.pop(job.id, None)
        state.dead[job.id] = _copy(job, lease="", failed_at=time.time())
        return True

    async def recover(self, channel: str, lease: float) -> int:
        bus = self.bus
        state = bus.channel(channel)
        now = time.monotonic()
        expired = [token for token, (_, until) in state.leased.items() if until <= now]
        for token in expired:
            job, _ = state.leased.pop(token)
            bus.push(
                state,
                _copy(job, lease="", attempt=job.attempt + 1, recoveries=job.recoveries + 1),
                now,
            )
        return len(expired)

    async def dead_letters(self, channel: str, limit: int) -> list[Job]:
        dead = self.bus.channel(channel).dead
        return [_copy(job) for job in itertools.islice(dead.values(), max(0, limit))]

    async def requeue(self, job_id: str, channel: str | None) -> bool:
        bus = self.bus
        names = [channel] if channel is not None else list(bus.channels)
        for name in names:
            state = bus.channel(name)
            job = state.dead.get(job_id)
            if job is None:
                continue
            if job_id in state.ids:
                raise QueueError(f"queue {name}: job {job_id} is pending or running; not requeued")
            del state.dead[job_id]
            state.ids.add(job_id)
            fresh = _copy(
                job, attempt=job.attempt + 1, failures=0, recoveries=0, error=None, failed_at=None
            )
            bus.push(state, fresh, time.monotonic())
            return True
        return False

    async def purge(self, channel: str) -> int:
        state = self.bus.channel(channel)
        count = len(state.dead)
        state.dead.clear()
        return count

    async def stats(self, channel: str) -> QueueStats:
        state = self.bus.channel(channel)
        now = time.monotonic()
        due = sum(1 for entry in state.heap if entry[0] <= now)
        return QueueStats(
            queued=due,
            delayed=len(state.heap) - due,
            running=len(state.leased),
            dead=len(state.dead),
        )

    async def channels(self, prefix: str = "") -> list[str]:
        """Channels starting with `prefix` that hold jobs: queued, delayed, running or dead.

        A subscription alone declares nothing here, as on PostgreSQL.
        """
        return [
            name
            for name, state in self.bus.channels.items()
            if name.startswith(prefix) and (state.heap or state.leased or state.dead)
        ]

    # Saving and loading.

    def _save(self, bus: _Bus) -> None:
        now_wall, now = time.time(), time.monotonic()
        channels: dict[str, Any] = {}
        for name, state in bus.channels.items():
            jobs = [
                _record(job, now_wall + max(0.0, due - now)) for due, _, job in sorted(state.heap)
            ]
            # Leases of instances that crashed: those jobs run again after a restart.
            jobs += [
                _record(
                    _copy(job, attempt=job.attempt + 1, recoveries=job.recoveries + 1), now_wall
                )
                for job, _ in state.leased.values()
            ]
            dead = [_record(job, None) for job in state.dead.values()]
            if jobs or dead:
                channels[name] = {"jobs": jobs, "dead": dead}
        if not channels:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        data = {"version": FORMAT_VERSION, "saved_at": now_wall, "channels": channels}
        tmp.write_bytes(orjson.dumps(data))
        os.replace(tmp, self.path)
        count = sum(len(c["jobs"]) for c in channels.values())
        logger.info("memory://%s queue: saved %d job(s) to %s", self.name, count, self.path)

    def _load(self, bus: _Bus) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        try:
            data = orjson.loads(raw)
            if data.get("version") != FORMAT_VERSION:
                raise ValueError(f"unknown format version {data.get('version')!r}")
            now_wall, now = time.time(), time.monotonic()
            count = 0
            for name, saved in data["channels"].items():
                state = bus.channel(name)
                for entry in saved["jobs"]:
                    job = _job(name, entry)
                    state.ids.add(job.id)
                    bus.push(state, job, now + max(0.0, float(entry["due"]) - now_wall))
                    count += 1
                for entry in saved["dead"]:
                    job = _job(name, entry)
                    state.dead[job.id] = job
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            aside = self.path.with_suffix(".corrupt")
            os.replace(self.path, aside)
            logger.error(
                "memory://%s queue: %s cannot be read (%s); moved to %s",
                self.name,
                self.path,
                exc,
                aside,
            )
            return
        # Loaded jobs now live in memory; the file would resurrect them after a crash.
        self.path.unlink()
        logger.info("memory://%s queue: loaded %d job(s) from %s", self.name, count, self.path)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _record(job: Job, due: float | None) -> dict[str, Any]:
    return {
        "id": job.id,
        "body": job.body.decode(),
        "enqueued_at": job.enqueued_at,
        "attempt": job.attempt,
        "failures": job.failures,
        "recoveries": job.recoveries,
        "error": job.error,
        "failed_at": job.failed_at,
        "due": due,
    }


def _job(channel: str, entry: dict[str, Any]) -> Job:
    return Job(
        id=str(entry["id"]),
        channel=channel,
        body=str(entry["body"]).encode(),
        enqueued_at=float(entry["enqueued_at"]),
        attempt=int(entry["attempt"]),
        failures=int(entry["failures"]),
        recoveries=int(entry["recoveries"]),
        error=entry.get("error"),
        failed_at=entry.get("failed_at"),
    )
