"""The `accord` command."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

import accord
from accord import Application, Settings
from accord.testing import cluster, wait_until
from conftest import AMQP_URL, POSTGRES_URL, REDIS_URL, unique
from servers import delete_queue_keys


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ACCORD_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "accord", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=environ,
    )


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"accord {accord.__version__}"


def test_no_command_prints_help_and_fails() -> None:
    result = run()
    assert result.returncode == 2
    assert "demo" in result.stdout


def test_demo_narrates_every_step(tmp_path: object) -> None:
    result = run("demo")
    assert result.returncode == 0, result.stderr
    for title in (
        "Lifecycle",
        "Database",
        "Cache",
        "Pub/sub",
        "Sync messages",
        "Event queue",
        "Locks",
    ):
        assert title in result.stdout
    assert "demo finished" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.rabbitmq
def test_doctor_reaches_every_configured_backend(tmp_path: object) -> None:
    result = run(
        "doctor",
        env={
            "ACCORD_DB_URL": POSTGRES_URL,
            "ACCORD_CLUSTER_URL": REDIS_URL,
            "ACCORD_QUEUE_URL": AMQP_URL,
            "ACCORD_STORAGE": str(tmp_path),
        },
    )
    assert result.returncode == 0, result.stdout
    assert "PostgreSQL" in result.stdout
    assert "Redis" in result.stdout
    assert "RabbitMQ" in result.stdout
    assert "guest:***@" in result.stdout  # the AMQP password is redacted


def test_doctor_fails_on_an_unreachable_backend(tmp_path: object) -> None:
    result = run(
        "doctor",
        env={"ACCORD_LOCK_URL": "redis://:secret@127.0.0.1:1/0", "ACCORD_STORAGE": str(tmp_path)},
    )
    assert result.returncode == 1
    assert "FAIL ACCORD_LOCK_URL" in result.stdout
    assert "unreachable" in result.stdout
    assert "secret" not in result.stdout + result.stderr


def test_doctor_reports_bad_settings(tmp_path: object) -> None:
    result = run("doctor", env={"ACCORD_QUEUE_URL": "kafka://127.0.0.1"})
    assert result.returncode == 1
    assert "ACCORD_QUEUE_URL: unknown scheme 'kafka'" in result.stdout


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ],
)
async def test_status_lists_the_instances_queues_and_locks_of_a_running_cluster(
    engine: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue(f"{engine}_url")
    name = unique("status")
    env = {"ACCORD_APP_NAME": name, "ACCORD_CLUSTER_URL": url, "ACCORD_STORAGE": str(tmp_path)}
    async with cluster(2, url=url, name=name) as apps:
        await apps[0].event_queue.publish("mail:out", {"to": "a"})
        await apps[0].event_queue.publish("mail:out", {"to": "b"})
        async with apps[1].lock_manager.lock("report/daily", ttl=30) as lock:
            as_json = await asyncio.to_thread(run, "status", "--json", env=env)
            as_text = await asyncio.to_thread(run, "status", env=env)

    assert as_json.returncode == 0, as_json.stderr
    status = json.loads(as_json.stdout)
    assert status["app"] == name
    assert {info["id"] for info in status["instances"]} == {app.instance_id for app in apps}
    assert status["observer"] not in {app.instance_id for app in apps}
    assert status["queues"] == {"mail:out": {"queued": 2, "delayed": 0, "running": 0, "dead": 0}}
    [holder] = status["locks"]
    assert holder["key"] == "report/daily"
    assert holder["instance_id"] == apps[1].instance_id
    assert holder["token"] == lock.fencing_token
    assert 0 < holder["expires_in"] <= 30
    assert status["embedded"] == []

    assert as_text.returncode == 0, as_text.stderr
    assert "instances: 2" in as_text.stdout
    assert "mail:out" in as_text.stdout and "queues: 1" in as_text.stdout
    assert "report/daily" in as_text.stdout and "locks held: 1" in as_text.stdout


def test_status_on_embedded_backends_says_there_is_nothing_to_read(tmp_path: Path) -> None:
    result = run("status", env={"ACCORD_STORAGE": str(tmp_path)})
    assert result.returncode == 2
    assert "ACCORD_CLUSTER_URL" in result.stderr
    assert "Traceback" not in result.stderr


# `accord worker` and `accord serve`, run as the operator runs them.

TESTS = Path(__file__).resolve().parent
PLUGIN = "worker_plugin:Recorder"


def instance_env(name: str, url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a worker/serve process: only these ACCORD_* variables, plugins on the path."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ACCORD_")}
    path = os.pathsep.join(p for p in (str(TESTS), environ.get("PYTHONPATH", "")) if p)
    environ.update(
        ACCORD_APP_NAME=name,
        ACCORD_CLUSTER_URL=url,
        ACCORD_STORAGE=str(tmp_path / "storage"),
        RECORDER_CHANNEL="jobs",
        PYTHONPATH=path,
        **extra,
    )
    return environ


async def spawn(env: dict[str, str], log: Path, *args: str) -> asyncio.subprocess.Process:
    with log.open("wb") as stderr:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "accord",
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    await wait_until(condition, timeout=30, interval=0.05, message=f"{what}: not within 30 s")


async def ended(process: asyncio.subprocess.Process, timeout: float = 60) -> int:
    return await asyncio.wait_for(process.wait(), timeout)


def reap(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()


@pytest.mark.redis
async def test_worker_runs_the_plugin_consumers_and_leaves_the_cluster_on_sigterm(
    redis_url: str, tmp_path: Path
) -> None:
    name = unique("wrk")
    log = tmp_path / "worker.log"
    settings = Settings(app_name=name, cluster_url=redis_url, storage=str(tmp_path / "test"))
    process = await spawn(
        instance_env(name, redis_url, tmp_path), log, "worker", "--plugin", PLUGIN
    )
    try:
        async with Application(settings=settings) as app:
            recorded = await app.cache_manager.create_cache(name="recorder", store="redis")
            for n in range(3):
                await app.event_queue.publish("jobs", {"n": n})
            # The last job is in flight when the worker is told to stop: it must finish.
            await app.event_queue.publish("jobs", {"n": 3, "sleep": 1.0})

            async def processed() -> bool:
                done = await recorded.mget([f"done:{n}" for n in range(3)])
                return None not in done and await recorded.get("started:3") is not None

            await wait_for(processed, "the worker processing the jobs")
            worker_id = await recorded.get("done:0")
            listed = [info.id for info in await app.cluster.instances()]
            process.send_signal(signal.SIGTERM)
            code = await ended(process)
            in_flight = await recorded.get("done:3")
            left = [info.id for info in await app.cluster.instances()]
            await recorded.reset()
    finally:
        reap(process)
        await delete_queue_keys(redis_url, name)

    stderr = log.read_text()
    assert code == 0, stderr
    assert worker_id in listed
    assert in_flight == worker_id
    assert worker_id not in left
    assert "SIGTERM received; stopping" in stderr
    assert "Traceback" not in stderr


@pytest.mark.redis
async def test_worker_aborts_on_a_second_signal_while_stopping(
    redis_url: str, tmp_path: Path
) -> None:
    name = unique("wrk")
    log = tmp_path / "worker.log"
    settings = Settings(app_name=name, cluster_url=redis_url, storage=str(tmp_path / "test"))
    env = instance_env(name, redis_url, tmp_path, ACCORD_STOP_GRACE="300")
    process = await spawn(env, log, "worker", "--plugin", PLUGIN, "--log-level", "info")
    try:
        async with Application(settings=settings) as app:
            recorded = await app.cache_manager.create_cache(name="recorder", store="redis")
            await app.event_queue.publish("jobs", {"n": 0, "sleep": 300})

            async def started() -> bool:
                return await recorded.get("started:0") is not None

            async def stopping() -> bool:
                return "stopping (send it again to abort)" in log.read_text()

            await wait_for(started, "the job starting")
            process.send_signal(signal.SIGINT)
            await wait_for(stopping, "the worker stopping")
            process.send_signal(signal.SIGINT)
            code = await ended(process)
            finished = await recorded.get("done:0")
            await recorded.reset()
    finally:
        reap(process)
        await delete_queue_keys(redis_url, name)

    stderr = log.read_text()
    assert code == 1, stderr
    assert finished is None
    assert "aborting" in stderr
    assert "Traceback" not in stderr


@pytest.mark.redis
async def test_serve_answers_health_and_status_then_stops_on_sigterm(
    redis_url: str, tmp_path: Path
) -> None:
    name = unique("srv")
    log = tmp_path / "serve.log"
    port = free_port()
    env = instance_env(name, redis_url, tmp_path)
    args = ("serve", "--plugin", PLUGIN, "--host", "127.0.0.1", "--port", str(port))
    process = await spawn(env, log, *args)
    try:

        async def healthy() -> bool:
            assert process.returncode is None, log.read_text()
            try:
                status, _ = await asyncio.to_thread(http_get, port, "/health")
            except OSError:
                return False
            return status == 200

        await wait_for(healthy, "GET /health answering 200")
        health = json.loads((await asyncio.to_thread(http_get, port, "/health"))[1])
        code, body = await asyncio.to_thread(http_get, port, "/status")
        process.send_signal(signal.SIGTERM)
        exit_code = await ended(process)
    finally:
        reap(process)
        await delete_queue_keys(redis_url, name)

    assert health["status"] == "ok" and health["app"] == name
    assert code == 200
    status = json.loads(body)
    assert status["app"] == name
    assert status["observer"] == health["instance_id"]
    assert health["instance_id"] in [info["id"] for info in status["instances"]]
    assert "jobs" in status["queues"]
    assert exit_code == 0, log.read_text()
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("worker_plugin", "is not module:Class"),
        ("no_such_module_here:Plugin", "cannot import module 'no_such_module_here'"),
        ("worker_plugin:Missing", "has no attribute 'Missing'"),
        ("worker_plugin:not_a_plugin", "not a subclass of accord.Plugin"),
    ],
)
@pytest.mark.parametrize("command", ["worker", "serve"])
def test_a_bad_plugin_spec_is_one_clear_line(command: str, spec: str, says: str) -> None:
    result = run(command, "--plugin", spec, env={"PYTHONPATH": str(TESTS)})
    assert result.returncode == 2
    assert result.stderr.strip() == result.stderr.strip().splitlines()[0]
    assert f"accord {command}: --plugin {spec!r}" in result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_reports_a_start_failure_without_the_password(tmp_path: Path) -> None:
    result = run(
        "worker",
        "--plugin",
        PLUGIN,
        env={
            "ACCORD_CLUSTER_URL": "redis://:secret@127.0.0.1:1/0",
            "ACCORD_STORAGE": str(tmp_path),
            "RECORDER_CHANNEL": "jobs",
            "PYTHONPATH": str(TESTS),
        },
    )
    assert result.returncode == 1
    assert "accord worker: start failed: Redis at redis://:***@127.0.0.1:1/0 is unreachable" in (
        result.stderr
    )
    assert "secret" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_worker_reports_bad_settings(tmp_path: Path) -> None:
    result = run("worker", "--plugin", PLUGIN, "--app", "no spaces", env={"PYTHONPATH": str(TESTS)})
    assert result.returncode == 1
    assert "ACCORD_APP_NAME: 'no spaces' is not a valid name" in result.stderr
    assert "Traceback" not in result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return int(reply.status), bytes(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
