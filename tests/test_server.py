"""accord.server: /health, /status and the status page, served by Uvicorn in the test's loop."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import uvicorn

from accord import Application, Settings
from accord.server import create_asgi_app
from conftest import unique
from servers import delete_queue_keys

NASTY_KEY = '<b>&"x"'


class Reply:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:])
        }

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> object:
        return json.loads(self.body)


async def get(port: int, path: str) -> Reply:
    """One HTTP/1.1 GET with `Connection: close`, read to the end."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    return Reply(raw)


@asynccontextmanager
async def serving(app: Application) -> AsyncIterator[int]:
    """Serve `create_asgi_app(app)` with Uvicorn on a free port of 127.0.0.1; yields the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_asgi_app(app), lifespan="off", log_config=None)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                assert not task.done(), task
                await asyncio.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


@pytest.mark.redis
async def test_routes_report_the_cluster_of_a_started_application(
    redis_url: str, tmp_path: Path
) -> None:
    name = unique("srv")
    settings = Settings(app_name=name, cluster_url=redis_url, storage=str(tmp_path))
    app = Application(settings=settings)
    try:
        async with serving(app) as port:
            before = await get(port, "/health")
            async with app:
                await app.event_queue.publish("mail:out", {"to": "a"})
                async with app.lock_manager.lock(NASTY_KEY, ttl=30) as lock:
                    health = await get(port, "/health")
                    status = await get(port, "/status")
                    page = await get(port, "/")
            after = await get(port, "/health")
            after_status = await get(port, "/status")
    finally:
        await delete_queue_keys(redis_url, name)

    assert before.status == 503
    assert before.json() == {"status": "new", "app": name, "instance_id": app.instance_id}
    assert health.status == 200
    assert health.headers["content-type"] == "application/json"
    assert health.json() == {"status": "ok", "app": name, "instance_id": app.instance_id}

    assert status.status == 200
    reading = status.json()
    assert isinstance(reading, dict)
    assert reading["app"] == name
    assert reading["observer"] == app.instance_id
    assert [info["id"] for info in reading["instances"]] == [app.instance_id]
    assert reading["queues"] == {"mail:out": {"queued": 1, "delayed": 0, "running": 0, "dead": 0}}
    [holder] = reading["locks"]
    assert holder["key"] == NASTY_KEY
    assert holder["instance_id"] == app.instance_id
    assert holder["token"] == lock.fencing_token
    assert reading["embedded"] == []

    assert page.status == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<meta http-equiv="refresh" content="5">' in page.text
    assert "<script" not in page.text and "http://" not in page.text
    assert "&lt;b&gt;&amp;&quot;x&quot;" in page.text
    assert NASTY_KEY not in page.text
    assert app.instance_id in page.text
    assert "<td>mail:out</td><td>1</td>" in page.text
    assert "instances: 1" in page.text and "locks held: 1" in page.text

    assert after.status == 503
    assert after.json() == {"status": "stopped", "app": name, "instance_id": app.instance_id}
    assert after_status.status == 503


async def test_status_on_embedded_defaults_names_what_it_cannot_read(
    settings: Settings,
) -> None:
    async with Application(settings=settings) as app, serving(app) as port:
        health = await get(port, "/health")
        status = await get(port, "/status")
        page = await get(port, "/")

    assert health.status == 200
    assert status.status == 200
    reading = status.json()
    assert isinstance(reading, dict)
    assert reading["observer"] == app.instance_id
    assert reading["embedded"] == ["ACCORD_CLUSTER_URL", "ACCORD_QUEUE_URL", "ACCORD_LOCK_URL"]
    assert reading["instances"] == [] and reading["queues"] == {} and reading["locks"] == []
    assert page.status == 200
    for variable in reading["embedded"]:
        assert f"{variable}: in-process backend" in page.text
    assert "instances: 0" in page.text


def test_importing_the_server_module_needs_no_starlette() -> None:
    code = (
        "import sys, accord.server, accord.cli; "
        "print(sorted(m for m in ('starlette', 'uvicorn') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
