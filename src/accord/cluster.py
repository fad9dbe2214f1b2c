"""Cluster membership: instance ids claimed through the backend, heartbeats, the live-instance list."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING, Protocol

from ._registry import load_adapter, scheme_of
from .config import POSTGRES_SCHEMES, REDIS_SCHEMES, Settings, env_name, redact
from .exceptions import AdapterError, StateError

if TYPE_CHECKING:
    from .app import Application

CLAIM_ATTEMPTS = 5

ADAPTERS = {
    "memory": "accord.adapters.memory.cluster:MemoryMembershipAdapter",
    "redis": "accord.adapters.redis.cluster:RedisMembershipAdapter",
    "rediss": "accord.adapters.redis.cluster:RedisMembershipAdapter",
    "postgresql": "accord.adapters.postgres.cluster:PostgresMembershipAdapter",
    "postgres": "accord.adapters.postgres.cluster:PostgresMembershipAdapter",
}


def new_instance_id() -> str:
    """A readable id, unique per live instance: host, process id and a random suffix."""
    host = socket.gethostname().split(".")[0][:24] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclasses.dataclass(frozen=True)
class InstanceInfo:
    """One live instance as the backend knows it; times are Unix seconds."""

    id: str
    host: str
    pid: int
    started_at: float
    last_beat: float


class MembershipAdapter(Protocol):
    """The I/O of membership on one engine; `Cluster` owns the timing and the meaning."""

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def claim(self, app: str, info: InstanceInfo, ttl: float) -> bool:
        """Register `info`; False if a live instance already holds `info.id`."""
        ...

    async def beat(self, app: str, info: InstanceInfo, ttl: float) -> bool:
        """Refresh the registration; False if it is gone (expired during a pause)."""
        ...

    async def leave(self, app: str, instance_id: str) -> None: ...

    async def instances(self, app: str, ttl: float) -> list[InstanceInfo]:
        """Instances whose last beat is younger than `ttl`, oldest start first."""
        ...


class ClusterState(enum.Enum):
    NEW = "new"
    JOINED = "joined"
    CLOSED = "closed"


class Cluster:
    """This instance's membership: it claims `app.instance_id` and beats until it stops.

    The backend is `cluster_url`, else the pub/sub URL when it is Redis or
    PostgreSQL, else an in-process table shared by the memory bus's name.

    Args:
        app: the application; `settings.heartbeat_interval` sets the beat (an
            instance is gone after three missed beats).
    """

    def __init__(self, app: Application) -> None:
        self.app = app
        self.interval = app.settings.heartbeat_interval
        self.url = membership_url(app.settings)
        self.state = ClusterState.NEW
        self.started_at = time.time()
        self.host = socket.gethostname()
        self._adapter: MembershipAdapter | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def ttl(self) -> float:
        return self.interval * 3

    def _info(self) -> InstanceInfo:
        return InstanceInfo(
            id=self.app.instance_id,
            host=self.host,
            pid=os.getpid(),
            started_at=self.started_at,
            last_beat=time.time(),
        )

    async def join(self) -> None:
        """Claim the instance id (drawing a new one on a clash) and start heartbeats."""
        if self.state is not ClusterState.NEW:
            raise StateError(f"cluster membership is {self.state.value}; it joins once")
        adapter_class = load_adapter(ADAPTERS, self.url, setting=env_name("cluster_url"))
        self._adapter = adapter_class(self.url)
        await self._adapter.connect()
        for _ in range(CLAIM_ATTEMPTS):
            if await self._adapter.claim(self.app.name, self._info(), self.ttl):
                break
            self.app.log.warning("instance id %s is taken by a live instance", self.app.instance_id)
            self.app.rename(new_instance_id())
        else:
            raise AdapterError(f"could not claim a free instance id in {CLAIM_ATTEMPTS} attempts")
        self.state = ClusterState.JOINED
        self._task = asyncio.create_task(
            self._heartbeat(), name=f"accord-heartbeat-{self.app.name}"
        )
        self.app.log.info("joined the cluster through %s", redact(self.url))

    async def instances(self) -> list[InstanceInfo]:
        """The live instances of this application, oldest first."""
        if self._adapter is None or self.state is not ClusterState.JOINED:
            raise StateError("cluster membership is not joined; start the application first")
        return await self._adapter.instances(self.app.name, self.ttl)

    async def _heartbeat(self) -> None:
        adapter = self._adapter
        if adapter is None:
            return
        while True:
            await asyncio.sleep(self.interval)
            try:
                if await adapter.beat(self.app.name, self._info(), self.ttl):
                    continue
                # The entry expired (the process was paused or cut off for 3 beats).
                if await adapter.claim(self.app.name, self._info(), self.ttl):
                    self.app.log.warning("membership had expired; registered again")
                else:
                    self.app.log.error(
                        "membership had expired and another live instance now holds id %s",
                        self.app.instance_id,
                    )
            except AdapterError as exc:
                self.app.log.warning("heartbeat failed: %s", exc)

    async def _stop_heartbeat(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # gather, unlike awaiting the task, lets a cancellation aimed at the
            # caller of close() through instead of swallowing it.
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def close(self) -> None:
        """Leave the cluster: stop beating and remove the registration."""
        await self._stop_heartbeat()
        if self._adapter is not None:
            if self.state is ClusterState.JOINED:
                try:
                    await self._adapter.leave(self.app.name, self.app.instance_id)
                except AdapterError as exc:
                    self.app.log.warning("leaving the cluster failed: %s", exc)
            await self._adapter.close()
        self.state = ClusterState.CLOSED

    async def abort(self) -> None:
        """Stop beating without leaving, as a crash would; the entry expires after `ttl`."""
        await self._stop_heartbeat()
        if self._adapter is not None:
            await self._adapter.close()
        self.state = ClusterState.CLOSED


def membership_url(settings: Settings) -> str:
    """Where instances register: `cluster_url`, else a Redis or PostgreSQL bus or lock URL."""
    if settings.cluster_url:
        return settings.cluster_url
    for url in (settings.resolved_pubsub_url, settings.resolved_lock_url):
        if scheme_of(url) in REDIS_SCHEMES | POSTGRES_SCHEMES:
            return url
    bus = settings.resolved_pubsub_url
    return bus if scheme_of(bus) == "memory" else "memory://"
