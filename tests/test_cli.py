"""The `accord` command."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import accord
from accord.testing import cluster
from conftest import AMQP_URL, POSTGRES_URL, REDIS_URL, unique


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
