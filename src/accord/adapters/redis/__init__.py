"""Redis adapters; the driver (redis-py) is imported here and nowhere else first."""

from __future__ import annotations

from ..._registry import require

require("redis.asyncio", feature="the Redis adapters")
