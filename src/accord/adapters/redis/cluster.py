"""Membership in Redis: one expiring key per instance and a sorted set of last beats."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from ... import _codec, _keys
from ...cluster import InstanceInfo
from ._client import acquire_client, map_errors, release_client


class RedisMembershipAdapter:
    """Membership for instances sharing one Redis."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: Any = None

    @staticmethod
    def _names(app: str, instance_id: str = "") -> tuple[str, str]:
        # Internal keys start with "accord:", which no cache key can (the app
        # name "accord" is reserved), so a cache's reset() never touches them.
        return _keys.join("accord", "instances", app), _keys.join(
            "accord", "instance", app, instance_id
        )

    async def connect(self) -> None:
        self._client = acquire_client(self.url)
        with map_errors(self.url):
            await self._client.ping()

    async def close(self) -> None:
        if self._client is not None:
            self._client = None
            await release_client(self.url)

    async def claim(self, app: str, info: InstanceInfo, ttl: float) -> bool:
        index, key = self._names(app, info.id)
        with map_errors(self.url):
            claimed = await self._client.set(
                key, _codec.encode(dataclasses.asdict(info)), nx=True, px=int(ttl * 1000)
            )
            if claimed:
                await self._client.zadd(index, {info.id: info.last_beat})
        return bool(claimed)

    async def beat(self, app: str, info: InstanceInfo, ttl: float) -> bool:
        index, key = self._names(app, info.id)
        with map_errors(self.url):
            kept = await self._client.pexpire(key, int(ttl * 1000))
            if kept:
                await self._client.zadd(index, {info.id: info.last_beat})
        return bool(kept)

    async def leave(self, app: str, instance_id: str) -> None:
        index, key = self._names(app, instance_id)
        with map_errors(self.url):
            await self._client.delete(key)
            await self._client.zrem(index, instance_id)

    async def instances(self, app: str, ttl: float) -> list[InstanceInfo]:
        index, _ = self._names(app)
        with map_errors(self.url):
            await self._client.zremrangebyscore(index, "-inf", time.time() - ttl)
            beats = await self._client.zrange(index, 0, -1, withscores=True)
            if not beats:
                return []
            ids = [member.decode() if isinstance(member, bytes) else member for member, _ in beats]
            raw = await self._client.mget([self._names(app, i)[1] for i in ids])
        found = []
        for (_, last_beat), data in zip(beats, raw, strict=True):
            if data is not None:
                found.append(InstanceInfo(**{**_codec.decode(data), "last_beat": float(last_beat)}))
        return sorted(found, key=lambda info: info.started_at)
