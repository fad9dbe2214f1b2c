"""The `accord` command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import accord
from conftest import AMQP_URL, POSTGRES_URL, REDIS_URL


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
