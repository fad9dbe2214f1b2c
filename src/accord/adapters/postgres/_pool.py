"""asyncpg pools from accord URLs, and the error boundary for asyncpg."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg

from ...config import redact
from ...exceptions import AdapterError, AdapterUnavailable

CONNECT_TIMEOUT = 5.0


def dsn(url: str) -> str:
    """An asyncpg DSN from an accord URL (`postgresql+asyncpg://` or `postgres://` accepted).

    Query parameters that are not connection options, such as
    `?search_path=schema`, reach the server as settings.
    """
    scheme, _, rest = url.partition("://")
    return f"postgresql://{rest}"


async def create_pool(url: str, **options: Any) -> asyncpg.Pool:
    options.setdefault("min_size", 1)
    options.setdefault("max_size", 10)
    options.setdefault("timeout", CONNECT_TIMEOUT)
    with map_errors(url):
        return await asyncpg.create_pool(dsn(url), **options)


async def connect(url: str, **options: Any) -> asyncpg.Connection:
    """A dedicated connection (for LISTEN, which needs one connection for its whole life)."""
    options.setdefault("timeout", CONNECT_TIMEOUT)
    with map_errors(url):
        return await asyncpg.connect(dsn(url), **options)


@contextmanager
def map_errors(url: str | None = None) -> Iterator[None]:
    """Translate asyncpg errors into accord's; the original stays on `__cause__`."""
    where = f" at {redact(url)}" if url else ""
    try:
        yield
    except (
        OSError,
        TimeoutError,
        asyncpg.exceptions.ConnectionDoesNotExistError,
        asyncpg.exceptions.InterfaceError,
        asyncpg.exceptions.CannotConnectNowError,
    ) as exc:
        raise AdapterUnavailable(f"PostgreSQL{where} is unreachable: {exc}") from exc
    except asyncpg.exceptions.PostgresError as exc:
        raise AdapterError(f"PostgreSQL{where} failed: {exc}") from exc
