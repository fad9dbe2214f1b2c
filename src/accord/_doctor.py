"""`accord doctor`: reach every configured backend and say what answered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ._registry import require, scheme_of
from .config import AMQP_SCHEMES, POSTGRES_SCHEMES, REDIS_SCHEMES, Settings, env_name, redact
from .exceptions import AccordError

CHECK_TIMEOUT = 5.0


@dataclass
class Check:
    setting: str
    url: str
    ok: bool
    detail: str


async def run_checks(settings: Settings) -> list[Check]:
    """Check the database and the URL behind every primitive (each distinct URL once)."""
    targets = {
        "db_url": settings.resolved_db_url,
        "pubsub_url": settings.resolved_pubsub_url,
        "queue_url": settings.resolved_queue_url,
        "lock_url": settings.resolved_lock_url,
    }
    if settings.cache_store == "redis" or settings.resolved_cache_url:
        targets["cache_url"] = settings.resolved_cache_url or ""
    results: list[Check] = []
    seen: dict[str, Check] = {}
    for field, url in targets.items():
        name = env_name(field)
        if url in seen and scheme_of(url) in _PROBES:
            earlier = seen[url]
            results.append(Check(name, redact(url) or "", earlier.ok, f"same as {earlier.setting}"))
            continue
        ok, detail = await _check(url)
        check = Check(name, redact(url) or "(unset)", ok, detail)
        seen[url] = check
        results.append(check)
    return results


async def _check(url: str) -> tuple[bool, str]:
    if not url:
        return False, "the redis cache store needs ACCORD_CACHE_URL or a Redis ACCORD_CLUSTER_URL"
    scheme = scheme_of(url)
    probe = _PROBES.get(scheme)
    if probe is None:
        return True, "embedded (in-process), nothing to reach"
    started = time.perf_counter()
    try:
        version = await asyncio.wait_for(probe(url), CHECK_TIMEOUT)
    except AccordError as exc:
        return False, str(exc)
    except TimeoutError:
        return False, f"no answer within {CHECK_TIMEOUT:.0f} s"
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, f"{version} ({(time.perf_counter() - started) * 1000:.1f} ms)"


async def _redis(url: str) -> str:
    require("redis.asyncio", feature=f"checking {redact(url)}")
    from .adapters.redis._client import map_errors, new_client

    client = new_client(url)
    try:
        with map_errors(url):
            info = await client.info("server")
        return f"Redis {info.get('redis_version', '?')}"
    finally:
        await client.aclose()


async def _postgres(url: str) -> str:
    require("asyncpg", feature=f"checking {redact(url)}")
    from .adapters.postgres._pool import connect, map_errors

    connection = await connect(url)
    try:
        with map_errors(url):
            version = await connection.fetchval("SHOW server_version")
        return f"PostgreSQL {version}"
    finally:
        await connection.close()


async def _amqp(url: str) -> str:
    require("aio_pika", feature=f"checking {redact(url)}")
    from .adapters.rabbitmq._channel import connect

    connection = await connect(url)
    try:
        properties = connection.transport.connection.server_properties  # type: ignore[union-attr]
        product, version = (
            _text(properties.get(key, default))
            for key, default in (("product", "AMQP broker"), ("version", "?"))
        )
        return f"{product} {version}"
    finally:
        await connection.close()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _sqlite(url: str) -> str:
    from .db import Database

    database = Database(url)
    await database.connect()
    await database.close()
    return "SQLite file is writable"


_PROBES: dict[str, Callable[[str], Awaitable[str]]] = {
    **dict.fromkeys(REDIS_SCHEMES, _redis),
    **dict.fromkeys(POSTGRES_SCHEMES | {"postgresql+asyncpg"}, _postgres),
    **dict.fromkeys(AMQP_SCHEMES, _amqp),
    "sqlite+aiosqlite": _sqlite,
}


def render(checks: list[Check]) -> str:
    width = max(len(check.setting) for check in checks)
    lines = []
    for check in checks:
        mark = "ok  " if check.ok else "FAIL"
        lines.append(f"{mark} {check.setting.ljust(width)}  {check.url}\n       {check.detail}")
    return "\n".join(lines)
