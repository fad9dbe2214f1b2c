"""The auto-pipelining Redis connection: batching, ordering, errors, cancellation, reconnects, auth."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions as redis_errors

from accord import StateError
from accord.adapters.redis._autopipeline import (
    AutoPipeline,
    Script,
    acquire_pipeline,
    release_pipeline,
)
from conftest import unique
from servers import RedisServer

pytestmark = pytest.mark.redis


@pytest.fixture
async def pipe(redis_url: str) -> AsyncIterator[AutoPipeline]:
    pipeline = AutoPipeline(redis_url)
    yield pipeline
    await pipeline.close()


@pytest.fixture
def prefix(pipe: AutoPipeline) -> Iterator[str]:
    name = unique("ap") + ":"
    yield name


async def _cleanup(pipe: AutoPipeline, prefix: str) -> None:
    cursor: Any = "0"
    while True:
        cursor, names = await pipe.execute("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)
        if names:
            await pipe.execute("UNLINK", *names)
        if cursor == b"0":
            return


class CountingTransport:
    """Wraps a transport and counts the writes that reach it."""

    def __init__(self, inner: asyncio.Transport) -> None:
        self.inner = inner
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_concurrent_commands_share_writes_and_get_their_own_replies(
    pipe: AutoPipeline, prefix: str
) -> None:
    await pipe.execute("PING")
    conn: Any = pipe._conn
    counter = CountingTransport(conn.transport)
    conn.transport = counter
    try:
        await asyncio.gather(*(pipe.execute("SET", f"{prefix}{i}", f"v{i}") for i in range(500)))
        replies = await asyncio.gather(*(pipe.execute("GET", f"{prefix}{i}") for i in range(500)))
        assert replies == [f"v{i}".encode() for i in range(500)]
        assert counter.writes <= 4  # 1000 commands, a handful of socket writes
    finally:
        conn.transport = counter.inner
        await _cleanup(pipe, prefix)


async def test_every_reply_type_is_parsed(pipe: AutoPipeline, prefix: str) -> None:
    big = b"x" * 300_000  # arrives in several chunks
    assert await pipe.execute("SET", f"{prefix}big", big) == b"OK"
    assert await pipe.execute("GET", f"{prefix}big") == big
    assert await pipe.execute("GET", f"{prefix}none") is None
    assert await pipe.execute("INCRBY", f"{prefix}n", 5) == 5
    assert await pipe.execute("RPUSH", f"{prefix}l", "a", "b", b"\r\n") == 3
    assert await pipe.execute("LRANGE", f"{prefix}l", 0, -1) == [b"a", b"b", b"\r\n"]
    assert await pipe.execute("MGET", f"{prefix}n", f"{prefix}none") == [b"5", None]
    assert await pipe.execute("PING") == b"PONG"
    await _cleanup(pipe, prefix)


async def test_an_error_reply_fails_only_its_own_command(pipe: AutoPipeline, prefix: str) -> None:
    await pipe.execute("SET", f"{prefix}s", "text")
    results = await asyncio.gather(
        pipe.execute("GET", f"{prefix}s"),
        pipe.execute("INCR", f"{prefix}s"),
        pipe.execute("ECHO", "after"),
        return_exceptions=True,
    )
    assert results[0] == b"text"
    assert isinstance(results[1], redis_errors.ResponseError)
    assert "not an integer" in str(results[1])
    assert results[2] == b"after"
    await _cleanup(pipe, prefix)


async def test_a_caller_that_stops_waiting_leaves_the_others_in_step(
    pipe: AutoPipeline, prefix: str
) -> None:
    await pipe.execute("SET", f"{prefix}a", "A")
    slow = asyncio.ensure_future(pipe.execute("WAIT", 1, 200))
    after = [asyncio.ensure_future(pipe.execute("GET", f"{prefix}a")) for _ in range(3)]
    await asyncio.sleep(0.05)
    slow.cancel()  # WAIT blocks this connection for 0.2 s: the GETs queue behind it
    assert await asyncio.gather(*after) == [b"A"] * 3
    assert await pipe.execute("ECHO", "next") == b"next"
    await _cleanup(pipe, prefix)


async def test_scripts_load_on_first_use(pipe: AutoPipeline) -> None:
    script = Script(f"return '{unique('lua')}' .. ARGV[1]")
    result = await pipe.run_script(script, [], ["!"])
    assert result.endswith(b"!")
    assert await pipe.execute("SCRIPT", "EXISTS", script.sha) == [1]
    assert await pipe.run_script(script, [], ["?"]) == result[:-1] + b"?"


async def test_a_killed_connection_fails_in_flight_commands_and_reconnects(
    pipe: AutoPipeline, redis_url: str
) -> None:
    my_id = await pipe.execute("CLIENT", "ID")
    blocked = asyncio.ensure_future(pipe.execute("WAIT", 1, 500))
    await asyncio.sleep(0.05)
    other = AutoPipeline(redis_url)
    try:
        assert await other.execute("CLIENT", "KILL", "ID", my_id) == 1
    finally:
        await other.close()
    with pytest.raises(redis_errors.ConnectionError):
        await blocked
    assert await pipe.execute("ECHO", "back") == b"back"
    assert await pipe.execute("CLIENT", "ID") != my_id


async def test_a_hung_server_trips_the_reply_timeout(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    pipe = AutoPipeline(server.url(), reply_timeout=0.5)
    try:
        assert await pipe.execute("PING") == b"PONG"
        server.pause()
        with pytest.raises(redis_errors.TimeoutError):
            await asyncio.wait_for(pipe.execute("PING"), timeout=30)
        server.resume()
        assert await pipe.execute("PING") == b"PONG"
    finally:
        await pipe.close()
        server.kill()


async def test_password_and_database_from_the_url(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="s3cret")
    server.start()
    pipe = AutoPipeline(server.url(db=2))
    wrong = AutoPipeline(server.url(password="nope"))
    try:
        await pipe.execute("SET", "k", "in-db-2")
        assert server.run("GET", "k", db=2) == b"in-db-2"
        assert server.run("GET", "k", db=0) is None
        with pytest.raises(redis_errors.AuthenticationError):
            await wrong.execute("PING")
    finally:
        await pipe.close()
        await wrong.close()
        server.kill()


async def test_rediss_urls_speak_tls(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, tls=True)
    server.start()
    unverified = AutoPipeline(server.url() + "?ssl_cert_reqs=none")
    verified = AutoPipeline(server.url() + f"?ssl_ca_certs={server.certificate}")
    untrusted = AutoPipeline(server.url(), connect_timeout=5)
    try:
        assert await unverified.execute("SET", "k", "over tls") == b"OK"
        assert await verified.execute("GET", "k") == b"over tls"
        with pytest.raises(redis_errors.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.execute("PING")  # a self-signed certificate is refused by default
    finally:
        for pipe in (unverified, verified, untrusted):
            await pipe.close()
        server.kill()


async def test_a_refused_connection_is_a_connection_error() -> None:
    pipe = AutoPipeline("redis://127.0.0.1:1/0", connect_timeout=2)
    try:
        with pytest.raises(redis_errors.ConnectionError, match="cannot connect"):
            await pipe.execute("PING")
    finally:
        await pipe.close()


async def test_a_closed_pipeline_refuses_commands(redis_url: str) -> None:
    pipe = AutoPipeline(redis_url)
    await pipe.execute("PING")
    await pipe.close()
    with pytest.raises(StateError, match="closed"):
        await pipe.execute("PING")


async def test_acquire_shares_per_url_and_the_last_release_closes(redis_url: str) -> None:
    first = acquire_pipeline(redis_url)
    second = acquire_pipeline(redis_url)
    assert first is second
    await first.execute("PING")
    await release_pipeline(redis_url)
    assert await second.execute("PING") == b"PONG"
    await release_pipeline(redis_url)
    with pytest.raises(StateError):
        await first.execute("PING")
    third = acquire_pipeline(redis_url)
    assert third is not first
    await release_pipeline(redis_url)
