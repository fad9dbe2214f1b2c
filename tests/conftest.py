"""Shared fixtures: real server URLs (env, localhost defaults) isolated per test."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from accord import Settings

REDIS_URL = os.environ.get("ACCORD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "ACCORD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
AMQP_URL = os.environ.get("ACCORD_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def unique(prefix: str = "t") -> str:
    """A short random name for keys, schemas, queues and app names."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


class Inbox:
    """A pub/sub handler that records what it receives."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def __call__(self, message: Any) -> None:
        self.messages.append(message)

    def __repr__(self) -> str:
        return f"Inbox({self.messages!r})"


def pubsub_settings(pubsub_url: str | None, tmp_path: Path, name: str | None = None) -> Settings:
    """Settings of an isolated app whose pub/sub runs on `pubsub_url`; queues and locks in memory."""
    name = name or unique("ps")
    return Settings(
        app_name=name,
        storage=str(tmp_path / unique("s")),
        pubsub_url=pubsub_url,
        queue_url=f"memory://{name}",
        lock_url=f"memory://{name}",
    )


def require_server(name: str, url: str, default_port: int) -> None:
    """Fail (never skip) with a clear message when a server is not listening."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        pytest.fail(
            f"{name} is not reachable at {host}:{port} ({exc}); start it with "
            f"`scripts/services` or point the ACCORD_TEST_* variable at a running server",
            pytrace=False,
        )


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    return tmp_path / "storage"


@pytest.fixture
def app_name() -> str:
    return unique("app")


@pytest.fixture
def settings(storage: Path, app_name: str) -> Settings:
    """Embedded defaults, isolated: a private storage folder and memory bus."""
    return Settings(app_name=app_name, storage=str(storage), pubsub_url=f"memory://{app_name}")


@pytest.fixture
def redis_url() -> str:
    """The Redis test server; isolate keys with a unique app name or prefix."""
    require_server("Redis", REDIS_URL, 6379)
    return REDIS_URL


def _run_sql(sql: str) -> None:
    """Run one statement on the test server from sync code (fixtures usable everywhere)."""
    import asyncpg

    async def run() -> None:
        connection = await asyncpg.connect(POSTGRES_URL)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    # A thread keeps this independent of whichever event loop the test runs in.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped after the test."""
    require_server("PostgreSQL", POSTGRES_URL, 5432)
    schema = unique("accord_t")
    _run_sql(f'CREATE SCHEMA "{schema}"')
    separator = "&" if "?" in POSTGRES_URL else "?"
    yield f"{POSTGRES_URL}{separator}search_path={schema}"
    _run_sql(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A `Database` URL, once a SQLite file of this test's own, once a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'shared.sqlite'}"
    base: str = request.getfixturevalue("postgres_url")
    return base.replace("postgresql://", "postgresql+asyncpg://", 1)


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A RabbitMQ URL on a fresh vhost for this test session, deleted afterwards."""
    require_server("RabbitMQ", AMQP_URL, 5672)
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        pytest.fail(
            "rabbitmqctl is not on PATH; it is needed to create a test vhost", pytrace=False
        )
    vhost = unique("accord_t")
    user = urlsplit(AMQP_URL).username or "guest"
    subprocess.run([ctl, "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run(
        [ctl, "set_permissions", "-p", vhost, user, ".*", ".*", ".*"],
        check=True,
        capture_output=True,
    )
    yield AMQP_URL.rstrip("/") + "/" + vhost
    subprocess.run([ctl, "delete_vhost", vhost], check=False, capture_output=True)
