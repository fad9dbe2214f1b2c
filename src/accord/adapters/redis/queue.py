"""Redis queue adapter: a stream and consumer group per channel, delayed jobs in a sorted set."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import redis.asyncio as aioredis

from ..._keys import SEPARATOR, escape, glob_escape, unescape
from ...event_queue import Job, QueueStats
from ...exceptions import AdapterError, AdapterUnavailable, QueueError, StateError
from . import _queue_lua as lua
from ._client import acquire_client, map_errors, release_client

#: The consumer group every instance of every application reads a channel's stream with.
GROUP = "accord"
PREFIX = "accord:queue:"
#: Hash job id -> channel, so `requeue(job_id)` finds a dead job without its channel.
DEAD_INDEX = PREFIX + "dead-index"
PROMOTE_LIMIT = 100
RECOVER_BATCH = 100
PURGE_BATCH = 500
#: Scripts retried once after a lost connection: running them twice does no harm.
RETRIED = frozenset({"enqueue", "ack", "renew", "recover", "stats", "unsubscribe"})
#: A consumer with nothing pending that has not read for this long is removed from the group.
STALE_CONSUMER = 600.0
#: Keys asked for per SCAN step when listing channels.
SCAN_COUNT = 500


class Keys(NamedTuple):
    stream: str
    delayed: str
    delayed_jobs: str
    ids: str
    dead: str
    dead_jobs: str


@functools.lru_cache(maxsize=1024)
def keys_of(channel: str) -> Keys:
    """Every key of one channel, built in one place."""
    base = PREFIX + escape(channel)
    return Keys(
        stream=base + ":stream",
        delayed=base + ":delayed",
        delayed_jobs=base + ":delayed-jobs",
        ids=base + ":ids",
        dead=base + ":dead",
        dead_jobs=base + ":dead-jobs",
    )


#: The last segment of every key of a channel (`stream`, `delayed`, ...).
_SUFFIXES = frozenset(key.rpartition(SEPARATOR)[2] for key in keys_of("channel"))


class RedisQueueAdapter:
    """Jobs in Redis: at least once, leases from the consumer group's pending list.

    A job is a stream entry read with XREADGROUP; it stays in the group's
    pending list until acknowledged, and the entry's idle time is its lease
    (renewed with XCLAIM). Recovery moves entries idle longer than the lease
    back to the end of the stream as new entries, so a worker whose lease
    expired can no longer acknowledge the old one. Every change is one Lua
    script, so no state is half-written when an instance dies.

    Args:
        url: `redis://host:port/db` or `rediss://...`.
        storage: unused (jobs live in Redis).
        client: a ready redis-py client to use instead of the shared one.
    """

    def __init__(
        self, url: str, *, storage: Path | str | None = None, client: aioredis.Redis | None = None
    ) -> None:
        self.url = url
        self._given = client
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._consumer = ""

    def __repr__(self) -> str:
        from ...config import redact

        return f"<RedisQueueAdapter {redact(self.url)}>"

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise StateError("the Redis queue adapter is not connected")
        return self._client

    async def connect(self) -> None:
        client = self._given if self._given is not None else acquire_client(self.url)
        try:
            with map_errors(self.url):
                await client.ping()
        except BaseException:
            if self._given is None:
                await release_client(self.url)
            raise
        self._client = client
        self._scripts = {
            name: client.register_script(source) for name, source in lua.SCRIPTS.items()
        }

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._given is None:
            await release_client(self.url)

    async def abort(self) -> None:
        await self.close()

    async def _run(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            with map_errors(self.url):
                return await self._scripts[script](keys=keys, args=args)
        except AdapterUnavailable:
            if script not in RETRIED:
                raise
        # After a server restart every idle pooled connection is dead; drop them
        # and try once more on a fresh one. Only scripts that are safe to run twice.
        with map_errors(self.url):
            await self.client.connection_pool.disconnect(inuse_connections=False)
            return await self._scripts[script](keys=keys, args=args)

    async def _create_group(self, stream: str) -> None:
        try:
            with map_errors(self.url):
                await self.client.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except AdapterError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def subscribe(self, channel: str, consumer: str, concurrency: int) -> None:
        self._consumer = consumer
        await self._create_group(keys_of(channel).stream)

    async def unsubscribe(self, channel: str, consumer: str) -> None:
        await self._run("unsubscribe", [keys_of(channel).stream], [GROUP, consumer])

    async def enqueue(self, job: Job, delay: float) -> bool:
        k = keys_of(job.channel)
        added = await self._run(
            "enqueue",
            [k.stream, k.delayed, k.delayed_jobs, k.ids],
            [job.id, _record(job), _ms(delay)],
        )
        return bool(added)

    async def claim(
        self, channel: str, consumer: str, count: int, lease: float, wait: float
    ) -> list[Job]:
        self._consumer = consumer
        k = keys_of(channel)
        args = [GROUP, consumer, count, PROMOTE_LIMIT]
        try:
            entries, next_due = await self._run(
                "claim", [k.stream, k.delayed, k.delayed_jobs], args
            )
        except AdapterError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._create_group(k.stream)
            entries, next_due = await self._run(
                "claim", [k.stream, k.delayed, k.delayed_jobs], args
            )
        if entries:
            return [_parse(channel, entries[i], entries[i + 1]) for i in range(0, len(entries), 2)]
        block = wait
        if int(next_due) >= 0:
            block = min(block, int(next_due) / 1000)
        if block <= 0:
            return []
        # A blocking read returns as soon as another instance adds a job.
        with map_errors(self.url):
            reply: Any = await self.client.xreadgroup(
                GROUP, consumer, {k.stream: ">"}, count=count, block=max(1, int(block * 1000))
            )
        # RESP2 replies [[stream, entries]]; RESP3 (a client given with protocol=3)
        # {stream: [entries]}.
        if isinstance(reply, dict):
            streams = [entries for wrapped in reply.values() for entries in wrapped]
        else:
            streams = [entries for _, entries in reply or ()]
        jobs = []
        for stream_entries in streams:
            for eid, fields in stream_entries:
                jobs.append(_parse(channel, eid, fields[b"j"]))
        return jobs

    async def ack(self, jobs: Sequence[Job]) -> list[bool]:
        results = [False] * len(jobs)
        for channel, indexes in _by_channel(jobs).items():
            k = keys_of(channel)
            args: list[Any] = [GROUP]
            for i in indexes:
                args += [jobs[i].lease, jobs[i].id]
            replies = await self._run("ack", [k.stream, k.ids], args)
            for i, reply in zip(indexes, replies, strict=True):
                results[i] = reply == 1
        return results

    async def renew(self, jobs: Sequence[Job], lease: float) -> list[bool]:
        results = [False] * len(jobs)
        for channel, indexes in _by_channel(jobs).items():
            args = [GROUP, self._consumer, *(jobs[i].lease for i in indexes)]
            replies = await self._run("renew", [keys_of(channel).stream], args)
            for i, reply in zip(indexes, replies, strict=True):
                results[i] = reply == 1
        return results

    async def retry(self, job: Job, delay: float) -> bool:
        k = keys_of(job.channel)
        args = [GROUP, job.lease, job.id, _record(job), _ms(delay)]
        return bool(await self._run("retry", [k.stream, k.delayed, k.delayed_jobs], args))

    async def release(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            await self.retry(job, 0)

    async def bury(self, job: Job) -> bool:
        k = keys_of(job.channel)
        record = _record(dataclasses.replace(job, failed_at=time.time()))
        args = [GROUP, job.lease, job.id, record, job.channel]
        return bool(
            await self._run("bury", [k.stream, k.ids, k.dead, k.dead_jobs, DEAD_INDEX], args)
        )

    async def recover(self, channel: str, lease: float) -> int:
        k = keys_of(channel)
        args = [GROUP, _ms(lease), RECOVER_BATCH, _ms(STALE_CONSUMER)]
        total = 0
        while True:
            try:
                count = int(await self._run("recover", [k.stream, k.ids], args))
            except AdapterError as exc:
                if "NOGROUP" in str(exc):
                    return total
                raise
            total += count
            if count < RECOVER_BATCH:
                return total

    async def dead_letters(self, channel: str, limit: int) -> list[Job]:
        if limit <= 0:
            return []
        k = keys_of(channel)
        with map_errors(self.url):
            ids: Any = await self.client.zrange(k.dead, 0, limit - 1)
            records: Any = await self.client.hmget(k.dead_jobs, ids) if ids else []
        return [_parse(channel, "", record) for record in records if record is not None]

    async def requeue(self, job_id: str, channel: str | None) -> bool:
        if channel is None:
            with map_errors(self.url):
                found: Any = await self.client.hget(DEAD_INDEX, job_id)
            if found is None:
                return False
            channel = _text(found)
        k = keys_of(channel)
        reply = await self._run(
            "requeue", [k.stream, k.ids, k.dead, k.dead_jobs, DEAD_INDEX], [job_id, channel]
        )
        if reply == -1:
            raise QueueError(f"queue {channel}: job {job_id} is pending or running; not requeued")
        return bool(reply)

    async def purge(self, channel: str) -> int:
        k = keys_of(channel)
        total = 0
        while True:
            count = int(
                await self._run("purge", [k.dead, k.dead_jobs, DEAD_INDEX], [channel, PURGE_BATCH])
            )
            total += count
            if count < PURGE_BATCH:
                return total

    async def stats(self, channel: str) -> QueueStats:
        k = keys_of(channel)
        queued, delayed, running, dead = await self._run(
            "stats", [k.stream, k.delayed, k.dead], [GROUP]
        )
        return QueueStats(queued=queued, delayed=delayed, running=running, dead=dead)

    async def channels(self, prefix: str = "") -> list[str]:
        """Channels starting with `prefix` with a key: a stream, delayed jobs or dead letters.

        A channel's stream stays once it has a job or a consumer group, so a
        channel subscribed to is listed even when empty. The keys are found
        with SCAN ... MATCH over the keys of those channels only (never KEYS).
        """
        match = glob_escape(PREFIX + escape(prefix)) + "*"
        found: set[str] = set()
        with map_errors(self.url):
            async for key in self.client.scan_iter(match=match, count=SCAN_COUNT):
                channel = channel_of(_text(key))
                if channel is not None and channel.startswith(prefix):
                    found.add(channel)
        return list(found)


def channel_of(key: str) -> str | None:
    """The channel whose key (as `keys_of` builds it) is `key`; None for any other key."""
    if not key.startswith(PREFIX):
        return None
    escaped, separator, suffix = key[len(PREFIX) :].rpartition(SEPARATOR)
    if not separator or suffix not in _SUFFIXES:
        return None
    return unescape(escaped)


def _ms(seconds: float) -> int:
    return max(0, int(seconds * 1000))


def _by_channel(jobs: Sequence[Job]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.channel, []).append(i)
    return groups


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _record(job: Job) -> bytes:
    """The record of `job` (see `_queue_lua`): a one-line header, then id, error and body."""
    job_id = job.id.encode()
    error = (job.error or "").encode()
    failed_at = repr(job.failed_at) if job.failed_at is not None else "-"
    header = (
        f"{job.attempt} {job.failures} {job.recoveries} {job.enqueued_at!r} {failed_at} "
        f"{len(job_id)} {len(error)}\n"
    )
    return header.encode() + job_id + error + job.body


def _parse(channel: str, lease: bytes | str, record: bytes) -> Job:
    try:
        header, _, rest = record.partition(b"\n")
        attempt, failures, recoveries, enqueued_at, failed_at, id_size, error_size = header.split()
        id_end = int(id_size)
        error_end = id_end + int(error_size)
        return Job(
            id=rest[:id_end].decode(),
            channel=channel,
            body=rest[error_end:],
            enqueued_at=float(enqueued_at),
            attempt=int(attempt),
            failures=int(failures),
            recoveries=int(recoveries),
            error=rest[id_end:error_end].decode() or None,
            lease=_text(lease),
            failed_at=None if failed_at == b"-" else float(failed_at),
        )
    except (ValueError, UnicodeDecodeError) as exc:
        raise QueueError(f"queue {channel}: a job record cannot be read ({exc})") from exc
