"""Redis clients shared per URL and event loop, and the error boundary for redis-py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from ...config import redact
from ...exceptions import AdapterError, AdapterUnavailable

SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0

_clients: dict[tuple[str, int], tuple[aioredis.Redis, int]] = {}


def _loop_key(url: str) -> tuple[str, int]:
    return url, id(asyncio.get_running_loop())


def new_client(url: str, **options: Any) -> aioredis.Redis:
    """A client with its own connection pool (for a dedicated pub/sub or blocking connection)."""
    options.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
    options.setdefault("health_check_interval", 15)
    with map_errors(url):
        return aioredis.Redis.from_url(url, **options)


def acquire_client(url: str) -> aioredis.Redis:
    """The client (and its pool) shared by everything in this event loop that uses `url`.

    Every call must be paired with `release_client(url)`; the pool closes with the last one.
    """
    key = _loop_key(url)
    client, users = _clients.get(key, (None, 0))
    if client is None:
        client = new_client(url, socket_timeout=SOCKET_TIMEOUT, max_connections=256)
    _clients[key] = (client, users + 1)
    return client


async def release_client(url: str) -> None:
    key = _loop_key(url)
    entry = _clients.get(key)
    if entry is None:
        return
    client, users = entry
    if users > 1:
        _clients[key] = (client, users - 1)
        return
    del _clients[key]
    await client.aclose()


@contextmanager
def map_errors(url: str | None = None) -> Iterator[None]:
    """Translate redis-py errors into accord's; the original stays on `__cause__`."""
    where = f" at {redact(url)}" if url else ""
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        raise AdapterUnavailable(f"Redis{where} is unreachable: {exc}") from exc
    except redis_errors.RedisError as exc:
        raise AdapterError(f"Redis{where} failed: {exc}") from exc
