"""PostgreSQL pub/sub adapter: large payloads through the table, reconnects, schema isolation."""

from __future__ import annotations

import socket
from pathlib import Path

import asyncpg
import pytest

from accord import AdapterUnavailable, Application
from accord.adapters.postgres.pubsub import INLINE_LIMIT, TABLE, PostgresPubSubAdapter
from accord.testing import cluster, wait_until
from conftest import POSTGRES_URL, Inbox, pubsub_settings, unique

pytestmark = pytest.mark.postgres

WAIT = 15.0


def schema_of(url: str) -> str:
    return url.rpartition("search_path=")[2]


async def test_large_payloads_go_through_the_table_in_order(
    postgres_url: str, tmp_path: Path
) -> None:
    async with cluster(2, settings=pubsub_settings(postgres_url, tmp_path)) as apps:
        inbox = Inbox()
        await apps[1].pub_sub_manager.subscribe("big", inbox)
        sequence = [
            "small-1",
            "x" * INLINE_LIMIT,  # just over the NOTIFY limit once enveloped
            "small-2",
            {"blob": "é" * 500_000},
            "small-3",
        ]
        for message in sequence:
            await apps[0].pub_sub_manager.publish("big", message)
        await wait_until(lambda: len(inbox.messages) == len(sequence), WAIT)
        assert inbox.messages == sequence

        connection = await asyncpg.connect(POSTGRES_URL)
        try:
            rows = await connection.fetchval(
                f'SELECT count(*) FROM "{schema_of(postgres_url)}".{TABLE}'
            )
        finally:
            await connection.close()
        assert rows == 2  # only the two large ones were stored


async def test_a_terminated_listen_connection_reconnects(postgres_url: str, tmp_path: Path) -> None:
    async with cluster(2, settings=pubsub_settings(postgres_url, tmp_path)) as apps:
        events: list[str] = []
        apps[1].on("pubsub:lost", lambda: events.append("lost"))
        apps[1].on("pubsub:restored", lambda: events.append("restored"))
        inbox = Inbox()
        await apps[1].pub_sub_manager.subscribe("news", inbox)
        adapter = apps[1].pub_sub_manager.adapter
        assert isinstance(adapter, PostgresPubSubAdapter)
        assert adapter._listen is not None
        pid = adapter._listen.get_server_pid()

        connection = await asyncpg.connect(POSTGRES_URL)
        try:
            assert await connection.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await connection.close()

        await wait_until(lambda: events == ["lost", "restored"], WAIT)
        await apps[0].pub_sub_manager.publish("news", "after")
        await wait_until(lambda: inbox.messages == ["after"], WAIT)


async def test_same_app_name_in_two_schemas_stays_apart(postgres_url: str, tmp_path: Path) -> None:
    other_schema = unique("accord_t")
    admin = await asyncpg.connect(POSTGRES_URL)
    await admin.execute(f'CREATE SCHEMA "{other_schema}"')
    try:
        other_url = postgres_url.replace(schema_of(postgres_url), other_schema)
        name = unique("same")
        async with (
            cluster(2, settings=pubsub_settings(postgres_url, tmp_path, name)) as first,
            cluster(2, settings=pubsub_settings(other_url, tmp_path, name)) as second,
        ):
            a, b = Inbox(), Inbox()
            await first[1].pub_sub_manager.subscribe("news", a)
            await second[1].pub_sub_manager.subscribe("news", b)
            await first[0].pub_sub_manager.publish("news", "first")
            await second[0].pub_sub_manager.publish("news", "second")
            await wait_until(lambda: a.messages and b.messages, WAIT)
            for apps in (first, second):  # a marker, so anything stray has arrived
                marker = Inbox()
                await apps[1].pub_sub_manager.subscribe("marker", marker)
                await apps[0].pub_sub_manager.publish("marker", 1)
                await wait_until(lambda marker=marker: marker.messages, WAIT)
            assert (a.messages, b.messages) == (["first"], ["second"])
            first_adapter = first[0].pub_sub_manager.adapter
            second_adapter = second[0].pub_sub_manager.adapter
            assert isinstance(first_adapter, PostgresPubSubAdapter)
            assert isinstance(second_adapter, PostgresPubSubAdapter)
            assert first_adapter.notify_channel != second_adapter.notify_channel
            assert len(first_adapter.notify_channel) <= 63
    finally:
        await admin.execute(f'DROP SCHEMA "{other_schema}" CASCADE')
        await admin.close()


async def test_start_fails_clearly_when_postgres_is_unreachable(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://postgres@127.0.0.1:{port}/test"
    app = Application(settings=pubsub_settings(url, tmp_path))
    with pytest.raises(AdapterUnavailable, match="unreachable"):
        await app.start()
