"""In-process membership table, shared by every Application using the same memory name."""

from __future__ import annotations

import dataclasses
import time

from ...cluster import InstanceInfo

# memory name -> app name -> instance id -> info
_TABLES: dict[str, dict[str, dict[str, InstanceInfo]]] = {}


class MemoryMembershipAdapter:
    """Membership for instances that live in one process."""

    def __init__(self, url: str) -> None:
        self.table = _TABLES.setdefault(url.partition("://")[2], {})

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def _live(self, app: str, ttl: float) -> dict[str, InstanceInfo]:
        members = self.table.setdefault(app, {})
        horizon = time.time() - ttl
        for instance_id in [i for i, info in members.items() if info.last_beat < horizon]:
            del members[instance_id]
        return members

    async def claim(self, app: str, info: InstanceInfo, ttl: float) -> bool:
        members = self._live(app, ttl)
        if info.id in members:
            return False
        members[info.id] = info
        return True

    async def beat(self, app: str, info: InstanceInfo, ttl: float) -> bool:
        members = self._live(app, ttl)
        current = members.get(info.id)
        if current is None:
            return False
        members[info.id] = dataclasses.replace(current, last_beat=info.last_beat)
        return True

    async def leave(self, app: str, instance_id: str) -> None:
        self.table.get(app, {}).pop(instance_id, None)

    async def instances(self, app: str, ttl: float) -> list[InstanceInfo]:
        return sorted(self._live(app, ttl).values(), key=lambda info: info.started_at)
