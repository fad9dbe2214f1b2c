"""Settings: every URL and option, validated once; the only module that reads the environment."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

from ._registry import require, scheme_of
from .exceptions import ConfigError

ENV_PREFIX = "ACCORD_"

REDIS_SCHEMES = frozenset({"redis", "rediss"})
POSTGRES_SCHEMES = frozenset({"postgresql", "postgres"})
AMQP_SCHEMES = frozenset({"amqp", "amqps"})
SQLITE_SCHEMES = frozenset({"sqlite", "sqlite+aiosqlite"})
DB_POSTGRES_SCHEMES = frozenset({"postgresql", "postgres", "postgresql+asyncpg"})

# Which URL schemes each setting accepts.
ALLOWED_SCHEMES: dict[str, frozenset[str]] = {
    "cluster_url": REDIS_SCHEMES | POSTGRES_SCHEMES,
    "cache_url": REDIS_SCHEMES,
    "pubsub_url": frozenset({"memory"}) | REDIS_SCHEMES | POSTGRES_SCHEMES | AMQP_SCHEMES,
    "queue_url": frozenset({"memory"}) | REDIS_SCHEMES | POSTGRES_SCHEMES | AMQP_SCHEMES,
    "lock_url": frozenset({"local", "memory"}) | REDIS_SCHEMES | POSTGRES_SCHEMES,
    "db_url": SQLITE_SCHEMES | DB_POSTGRES_SCHEMES,
}

# The driver module each scheme needs, checked at start so a missing extra
# fails before anything connects.
DRIVERS: dict[str, str] = {
    **{scheme: "redis.asyncio" for scheme in REDIS_SCHEMES},
    **{scheme: "asyncpg" for scheme in POSTGRES_SCHEMES | {"postgresql+asyncpg"}},
    **{scheme: "aio_pika" for scheme in AMQP_SCHEMES},
}

# Server-side names of accord's own structures start with this segment.
RESERVED_NAME = "accord"

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def env_name(field: str) -> str:
    """The environment variable of a setting: `queue_url` -> `ACCORD_QUEUE_URL`."""
    return ENV_PREFIX + field.upper()


def redact(url: str | None) -> str | None:
    """`url` with its password replaced by `***`; safe for logs and reprs."""
    if not url or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<malformed url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


@dataclasses.dataclass(frozen=True, repr=False)
class Settings:
    """Everything accord needs to know about where its state lives.

    Args:
        app_name: the application's name; namespaces every key, channel and table row.
            Default "main".
        db_url: SQLAlchemy URL of the application database. Default: SQLite in `storage`.
        cluster_url: one Redis or PostgreSQL URL for pub/sub, queue and locks. Default unset.
        cache_store: the store of caches created without one ("memory" or "redis").
            Default "memory".
        cache_url: Redis URL of the `redis` cache store. Default: `cluster_url`.
        pubsub_url: pub/sub adapter URL. Default: `cluster_url`, else "memory://".
        queue_url: event queue adapter URL. Default: `cluster_url`, else "memory://".
        lock_url: lock adapter URL. Default: `cluster_url`, else "local".
        storage: folder for the SQLite database and the memory queue's saved jobs.
            Default "./storage".
        channel_prefix: an extra prefix for pub/sub channels. Default "".
        stop_grace: seconds that stop waits for in-flight work before cancelling it.
            Default 10.
        queue_lease: seconds a claimed job stays leased without renewal. Default 30.
        queue_check_interval: seconds between checks for expired leases. Default 15.
        heartbeat_interval: seconds between membership heartbeats; an instance is
            gone after three missed beats. Default 5.
    """

    app_name: str = "main"
    db_url: str | None = None
    cluster_url: str | None = None
    cache_store: str = "memory"
    cache_url: str | None = None
    pubsub_url: str | None = None
    queue_url: str | None = None
    lock_url: str | None = None
    storage: str = "./storage"
    channel_prefix: str = ""
    stop_grace: float = 10.0
    queue_lease: float = 30.0
    queue_check_interval: float = 15.0
    heartbeat_interval: float = 5.0

    def __post_init__(self) -> None:
        if not self.app_name or not _NAME.match(self.app_name):
            raise ConfigError(
                f"{env_name('app_name')}: {self.app_name!r} is not a valid name; "
                "use letters, digits, '_', '-' or '.'"
            )
        if self.app_name == RESERVED_NAME:
            raise ConfigError(
                f"{env_name('app_name')}: {RESERVED_NAME!r} is reserved for accord's own "
                "keys and channels; choose another application name"
            )
        if not self.cache_store or not _NAME.match(self.cache_store):
            raise ConfigError(
                f"{env_name('cache_store')}: {self.cache_store!r} is not a store name; "
                "use 'memory' or 'redis'"
            )
        for field in ALLOWED_SCHEMES:
            url = getattr(self, field)
            if url is not None:
                _check_url(field, url)
        for field in ("stop_grace", "queue_lease", "queue_check_interval", "heartbeat_interval"):
            value = getattr(self, field)
            if not isinstance(value, int | float) or value <= 0:
                raise ConfigError(
                    f"{env_name(field)}: {value!r} is not a positive number of seconds"
                )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from `ACCORD_*` environment variables; keyword arguments win.

        Args:
            environ: the mapping to read. Default: `os.environ`.
            **overrides: any field of `Settings`.
        """
        source = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = source.get(env_name(field.name))
            if raw is None or raw.strip() == "":
                continue
            if field.type == "float":
                try:
                    values[field.name] = float(raw)
                except ValueError:
                    raise ConfigError(
                        f"{env_name(field.name)}: {raw!r} is not a number of seconds"
                    ) from None
            else:
                values[field.name] = raw.strip()
        unknown = set(overrides) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # Effective URLs: a specific URL wins over cluster_url, which wins over the embedded default.

    @property
    def storage_path(self) -> Path:
        return Path(self.storage)

    @property
    def resolved_db_url(self) -> str:
        if self.db_url is None:
            path = self.storage_path.resolve() / f"{self.app_name}.sqlite"
            return f"sqlite+aiosqlite:///{path}"
        scheme = scheme_of(self.db_url)
        rest = self.db_url.partition("://")[2]
        if scheme in SQLITE_SCHEMES:
            return f"sqlite+aiosqlite://{rest}"
        return f"postgresql+asyncpg://{rest}"

    @property
    def resolved_pubsub_url(self) -> str:
        return self.pubsub_url or self.cluster_url or "memory://"

    @property
    def resolved_queue_url(self) -> str:
        return self.queue_url or self.cluster_url or "memory://"

    @property
    def resolved_lock_url(self) -> str:
        return self.lock_url or self.cluster_url or "local"

    @property
    def resolved_cache_url(self) -> str | None:
        if self.cache_url:
            return self.cache_url
        if self.cluster_url and scheme_of(self.cluster_url) in REDIS_SCHEMES:
            return self.cluster_url
        return None

    def check_dependencies(self) -> None:
        """Import the driver of every configured engine; `MissingDependency` names the extra.

        Each URL is checked under the setting that the user actually gave, so the
        error names the variable to change.
        """
        urls = {"db_url": self.resolved_db_url}
        for field in ("cluster_url", "cache_url", "pubsub_url", "queue_url", "lock_url"):
            url = getattr(self, field)
            if url is not None:
                urls[field] = url
        for field, url in urls.items():
            module = DRIVERS.get(scheme_of(url))
            if module is not None:
                require(module, feature=f"{env_name(field)}={redact(url)}")

    def __repr__(self) -> str:
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.endswith("_url"):
                value = redact(value)
            if value != field.default:
                parts.append(f"{field.name}={value!r}")
        return f"Settings({', '.join(parts)})"


def _check_url(field: str, url: str) -> None:
    name = env_name(field)
    allowed = ALLOWED_SCHEMES[field]
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"{name}: expected a URL, got {url!r}")
    scheme = scheme_of(url)
    if scheme not in allowed:
        raise ConfigError(
            f"{name}: unknown scheme {scheme!r} in {redact(url)!r}; "
            f"use one of: {', '.join(sorted(allowed))}"
        )
    if scheme in {"local", "memory"} or scheme in SQLITE_SCHEMES:
        return
    if "://" not in url:
        raise ConfigError(f"{name}: {url!r} is not a URL; write it as {scheme}://host:port/...")
    try:
        parts: SplitResult = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{name}: malformed URL {redact(url)!r} ({exc})") from None
    if not parts.hostname:
        raise ConfigError(f"{name}: {redact(url)!r} has no host; write {scheme}://host:port/...")
    if port == 0:
        raise ConfigError(f"{name}: {redact(url)!r} has port 0")
