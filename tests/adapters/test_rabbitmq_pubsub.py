"""RabbitMQ pub/sub adapter: exchange and queue layout, reconnect after the broker drops us."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import aiormq
import pytest

from accord import AdapterUnavailable, Application
from accord.adapters.rabbitmq.pubsub import RabbitMQPubSubAdapter
from accord.testing import cluster, wait_until
from conftest import Inbox, pubsub_settings

pytestmark = pytest.mark.rabbitmq

WAIT = 20.0


async def queue_exists(url: str, name: str) -> bool:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelLockedResource:
            return True  # exclusive to another connection: it exists
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return True
    finally:
        await connection.close()


async def test_one_exclusive_queue_per_instance_on_a_fanout_exchange(
    amqp_url: str, tmp_path: Path
) -> None:
    async with cluster(3, settings=pubsub_settings(amqp_url, tmp_path)) as apps:
        adapters = [app.pub_sub_manager.adapter for app in apps]
        assert all(isinstance(adapter, RabbitMQPubSubAdapter) for adapter in adapters)
        names = {adapter.queue_name for adapter in adapters}  # type: ignore[union-attr]
        exchanges = {adapter.exchange_name for adapter in adapters}  # type: ignore[union-attr]
        assert len(names) == 3 and exchanges == {f"accord.pubsub.{apps[0].name}"}
        for app, adapter in zip(apps, adapters, strict=True):
            assert app.instance_id in adapter.queue_name  # type: ignore[union-attr]
        stopped = adapters[0].queue_name  # type: ignore[union-attr]
        await apps[0].stop()
        # auto-delete + exclusive: the queue goes with its connection.
        assert not await queue_exists(amqp_url, stopped)


async def test_the_broker_closing_our_connection_reconnects_and_redeclares(
    amqp_url: str, tmp_path: Path
) -> None:
    ctl = shutil.which("rabbitmqctl")
    assert ctl is not None, "rabbitmqctl is needed to close a connection from the broker side"
    async with cluster(2, settings=pubsub_settings(amqp_url, tmp_path)) as apps:
        events: list[str] = []
        apps[1].on("pubsub:lost", lambda: events.append("lost"))
        apps[1].on("pubsub:restored", lambda: events.append("restored"))
        inbox = Inbox()
        await apps[1].pub_sub_manager.subscribe("news", inbox)
        adapter = apps[1].pub_sub_manager.adapter
        assert isinstance(adapter, RabbitMQPubSubAdapter)

        vhost = urlsplit(amqp_url).path.lstrip("/")
        listing = subprocess.run(
            [ctl, "list_connections", "-q", "--no-table-headers", "pid", "client_properties"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        target = f"{adapter.queue_name}:consume"
        pids = [line.split("\t")[0] for line in listing.splitlines() if target in line]
        assert len(pids) == 1, listing
        subprocess.run(
            [ctl, "close_connection", pids[0], "test: broker closes the connection"],
            check=True,
            capture_output=True,
        )

        await wait_until(lambda: events == ["lost", "restored"], WAIT)
        assert await queue_exists(amqp_url, adapter.queue_name)
        assert vhost  # the fixture gives each session its own vhost
        await apps[0].pub_sub_manager.publish("news", "after")
        await wait_until(lambda: inbox.messages == ["after"], WAIT)


async def test_large_messages_round_trip(amqp_url: str, tmp_path: Path) -> None:
    async with cluster(2, settings=pubsub_settings(amqp_url, tmp_path)) as apps:
        inbox = Inbox()
        await apps[1].pub_sub_manager.subscribe("big", inbox)
        big = {"blob": "ü" * 1_000_000, "list": list(range(1000))}
        await apps[0].pub_sub_manager.publish("big", big)
        await wait_until(lambda: inbox.messages == [big], WAIT)


async def test_start_fails_clearly_when_rabbitmq_is_unreachable(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = Application(settings=pubsub_settings(f"amqp://guest:guest@127.0.0.1:{port}/", tmp_path))
    with pytest.raises(AdapterUnavailable, match="unreachable"):
        await app.start()
