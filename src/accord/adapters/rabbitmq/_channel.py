"""RabbitMQ connections through aio-pika, and the error boundary for it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aio_pika
import aiormq.exceptions

from ...config import redact
from ...exceptions import AdapterError, AdapterUnavailable

CONNECT_TIMEOUT = 5.0


async def connect(url: str, **options: Any) -> aio_pika.abc.AbstractRobustConnection:
    """A robust connection: aio-pika reconnects it and re-declares what was declared on it."""
    options.setdefault("timeout", CONNECT_TIMEOUT)
    with map_errors(url):
        connection: aio_pika.abc.AbstractRobustConnection = await aio_pika.connect_robust(
            url, **options
        )
        return connection


@contextmanager
def map_errors(url: str | None = None) -> Iterator[None]:
    """Translate aio-pika and aiormq errors into accord's; the original stays on `__cause__`."""
    where = f" at {redact(url)}" if url else ""
    try:
        yield
    except (
        OSError,
        TimeoutError,
        aiormq.exceptions.AMQPConnectionError,
        # aiormq raises this (a RuntimeError) for a call on a channel that has closed.
        aiormq.exceptions.ChannelInvalidStateError,
    ) as exc:
        raise AdapterUnavailable(f"RabbitMQ{where} is unreachable: {exc}") from exc
    except aiormq.exceptions.AMQPError as exc:
        raise AdapterError(f"RabbitMQ{where} failed: {exc}") from exc
