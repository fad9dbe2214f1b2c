"""Settings: environment, overrides, URL validation, missing extras and password redaction."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from accord import Application, AppState, ConfigError, MissingDependency, Settings
from accord.config import redact


def test_defaults_are_the_embedded_engines() -> None:
    settings = Settings.from_env({})
    assert settings.app_name == "main"
    assert settings.resolved_pubsub_url == "memory://"
    assert settings.resolved_queue_url == "memory://"
    assert settings.resolved_lock_url == "local"
    assert settings.cache_store == "memory"
    assert settings.resolved_cache_url is None
    assert settings.resolved_db_url.startswith("sqlite+aiosqlite:///")
    assert settings.resolved_db_url.endswith("/storage/main.sqlite")


def test_from_env_reads_every_variable_and_keywords_win() -> None:
    environ = {
        "ACCORD_APP_NAME": "shop",
        "ACCORD_CLUSTER_URL": "redis://127.0.0.1:6379/0",
        "ACCORD_QUEUE_URL": "amqp://guest:guest@127.0.0.1:5672/",
        "ACCORD_DB_URL": "postgresql://u@127.0.0.1/db",
        "ACCORD_STORAGE": "/tmp/shop",
        "ACCORD_STOP_GRACE": "2.5",
        "ACCORD_LOCK_URL": "",  # empty means unset
    }
    settings = Settings.from_env(environ, app_name="override")
    assert settings.app_name == "override"
    assert settings.stop_grace == 2.5
    assert settings.resolved_pubsub_url == "redis://127.0.0.1:6379/0"
    assert settings.resolved_lock_url == "redis://127.0.0.1:6379/0"
    assert settings.resolved_queue_url == "amqp://guest:guest@127.0.0.1:5672/"  # specific wins
    assert settings.resolved_cache_url == "redis://127.0.0.1:6379/0"
    assert settings.cache_store == "memory"  # the default store stays memory
    assert settings.resolved_db_url == "postgresql+asyncpg://u@127.0.0.1/db"
    assert settings.storage_path == Path("/tmp/shop")


def test_postgres_cluster_url_does_not_become_a_cache_url() -> None:
    settings = Settings(cluster_url="postgresql://u@127.0.0.1/db")
    assert settings.resolved_lock_url == "postgresql://u@127.0.0.1/db"
    assert settings.resolved_cache_url is None


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "ACCORD_PUBSUB_URL",
            "kafka://127.0.0.1:9092",
            "ACCORD_PUBSUB_URL: unknown scheme 'kafka'",
        ),
        ("ACCORD_CLUSTER_URL", "amqp://127.0.0.1", "ACCORD_CLUSTER_URL: unknown scheme 'amqp'"),
        ("ACCORD_LOCK_URL", "redis://127.0.0.1:notaport/0", "ACCORD_LOCK_URL: malformed URL"),
        ("ACCORD_QUEUE_URL", "redis:///0", "ACCORD_QUEUE_URL: 'redis:///0' has no host"),
        ("ACCORD_DB_URL", "mysql://127.0.0.1/db", "ACCORD_DB_URL: unknown scheme 'mysql'"),
        ("ACCORD_CACHE_URL", "   ", None),  # blank is unset, not an error
        ("ACCORD_APP_NAME", "has space", "ACCORD_APP_NAME: 'has space' is not a valid name"),
        ("ACCORD_APP_NAME", "accord", "ACCORD_APP_NAME: 'accord' is reserved"),
        ("ACCORD_STOP_GRACE", "soon", "ACCORD_STOP_GRACE: 'soon' is not a number"),
        ("ACCORD_QUEUE_LEASE", "-1", "ACCORD_QUEUE_LEASE: -1.0 is not a positive number"),
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str, message: str | None) -> None:
    if message is None:
        Settings.from_env({variable: value})
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        Settings.from_env({variable: value})


def test_unknown_keyword_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown settings: colour"):
        Settings.from_env({}, colour="blue")


def test_passwords_never_reach_a_repr_or_a_log(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(
        cluster_url="redis://:s3cret@127.0.0.1:6379/0",
        queue_url="amqp://guest:hunter2@127.0.0.1:5672/",
        db_url="postgresql://me:pa55@127.0.0.1/db",
    )
    text = repr(settings)
    for secret in ("s3cret", "hunter2", "pa55"):
        assert secret not in text
    assert "redis://:***@127.0.0.1:6379/0" in text
    assert redact("amqp://guest:hunter2@host/") == "amqp://guest:***@host/"
    assert redact("redis://127.0.0.1:6379") == "redis://127.0.0.1:6379"
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("settings: %r", settings)
    assert "s3cret" not in caplog.text


def test_url_errors_do_not_echo_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(pubsub_url="kafka://user:topsecret@127.0.0.1:9092")
    assert "topsecret" not in str(caught.value)


async def test_missing_extra_fails_the_start_with_the_pip_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A None entry in sys.modules makes `import redis.asyncio` raise ImportError.
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    settings = Settings(cluster_url="redis://127.0.0.1:6379/0", storage=str(tmp_path))
    app = Application(settings=settings)
    with pytest.raises(MissingDependency) as caught:
        await app.start()
    message = str(caught.value)
    assert "ACCORD_CLUSTER_URL" in message
    assert "pip install 'accord[redis]'" in message
    # Nothing half-started: no state change, no database file.
    assert app.state is AppState.NEW
    assert not any(tmp_path.iterdir())


async def test_missing_driver_for_postgres_names_the_postgres_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    settings = Settings(lock_url="postgresql://u@127.0.0.1/db", storage=str(tmp_path))
    with pytest.raises(MissingDependency, match=r"ACCORD_LOCK_URL.*accord\[postgres\]"):
        await Application(settings=settings).start()
