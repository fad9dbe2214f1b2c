"""Token policy: one auth token policy per application, kept in the database, read through a cache.

Every instance must apply the same policy and reads it on every request, so
it lives in a cache (shared on Redis) and is read through `Cache.wrap`. A
change is written in a transaction; once it commits, the cached copy is
dropped here and, through a sync message, on every other instance.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Column, DateTime, MetaData, String, Table, Text, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection

from ..cache import Cache
from ..db import Transaction
from ..exceptions import StateError
from ..plugin import Plugin

__all__ = ["TokenPolicy", "TokenPolicyPlugin", "Verdict", "token_policies"]

#: What `TokenPolicy.check` says about a token.
Verdict = Literal["valid", "renew", "expired"]

DEFAULT_CACHE_TTL = 300.0
#: The cache key of the policy.
CACHE_KEY = "policy"
#: Seconds `wrap(lock=True)` and the invalidation wait for each other at most.
LOCK_TIMEOUT = 30.0

metadata = MetaData()
token_policies = Table(
    "accord_token_policy",
    metadata,
    Column("app", String(200), primary_key=True),
    Column("value", Text, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


def _seconds(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number of seconds, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive, finite number of seconds, got {value!r}")
    return float(value)


def _instant(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"check(): {what} must be seconds since the epoch, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"check(): {what} must be a finite number, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class TokenPolicy:
    """How long auth tokens and sessions live; every field in seconds.

    Args:
        token_ttl: how long a token is valid after it is issued. Default 86400 (one day).
        session_ttl: how long a session may be kept alive by renewing its token,
            counted from the session's start; at least `token_ttl`. Default 604800 (7 days).
        renew_window: how long after a token expired it may still be exchanged for
            a new one. Default 900.

    Every field must be a positive, finite number (`TypeError` for a non-number,
    `ValueError` otherwise), and `session_ttl >= token_ttl` (`ValueError`).

    Example:
        policy = TokenPolicy(token_ttl=3600)
        policy.check(issued_at=t0, session_started_at=t0, now=time.time())   # "valid"
    """

    token_ttl: float = 86400.0
    session_ttl: float = 7 * 86400.0
    renew_window: float = 900.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = _seconds(f"token policy {field.name}", getattr(self, field.name))
            object.__setattr__(self, field.name, value)
        if self.session_ttl < self.token_ttl:
            raise ValueError(
                f"token policy session_ttl ({self.session_ttl:g} s) must be at least "
                f"token_ttl ({self.token_ttl:g} s): a session cannot end before its first token"
            )

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The policy's field names."""
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenPolicy:
        """A policy from `to_dict()` data; missing fields take their defaults.

        Args:
            data: field name -> seconds. An unknown name is a `ValueError`.
        """
        _check_names(data)
        return cls(**data)

    def to_dict(self) -> dict[str, float]:
        """Field name -> seconds, JSON-compatible."""
        return dataclasses.asdict(self)

    def check(self, issued_at: float, session_started_at: float, now: float) -> Verdict:
        """What to do with a token at `now`; every argument in seconds since the epoch.

        The first rule that holds decides (each interval includes its start and
        excludes its end, so an instant on a boundary belongs to the later state):

        1. `now >= session_started_at + session_ttl`: "expired". The session is
           over; no token of it is valid or renewable any more.
        2. `now < issued_at + token_ttl`: "valid".
        3. `now < issued_at + token_ttl + renew_window`: "renew". The token has
           expired but may be exchanged for a new one.
        4. otherwise: "expired".

        Args:
            issued_at: when the token was issued.
            session_started_at: when its session started (the first token's `issued_at`).
            now: the time to judge the token at.

        Raises `ValueError` if a time is not finite or the token was issued
        before its session started, `TypeError` if one is not a number.
        """
        issued_at = _instant("issued_at", issued_at)
        session_started_at = _instant("session_started_at", session_started_at)
        now = _instant("now", now)
        if issued_at < session_started_at:
            raise ValueError(
                f"check(): the token was issued ({issued_at}) before its session started "
                f"({session_started_at}); pass the session's start as session_started_at"
            )
        if now >= session_started_at + self.session_ttl:
            return "expired"
        expires_at = issued_at + self.token_ttl
        if now < expires_at:
            return "valid"
        if now < expires_at + self.renew_window:
            return "renew"
        return "expired"


def _check_names(data: Mapping[str, Any]) -> None:
    unknown = sorted(set(data) - set(TokenPolicy.fields()))
    if unknown:
        raise ValueError(
            f"unknown token policy field(s) {', '.join(map(repr, unknown))}; "
            f"the fields are {', '.join(TokenPolicy.fields())}"
        )


class TokenPolicyPlugin(Plugin):
    """The application's auth token policy, the same on every instance.

    The policy is one row of `accord_token_policy` per application; reads go
    through the cache `token-policy` (`wrap` with `lock=True`: on a cold shared
    cache one instance of the cluster loads it, the others read its copy).

    Args:
        store: the cache store. Default: "redis" when the cache settings name a
            Redis server (`cache_url`, or a Redis `cluster_url`), else the default store.
        cache_ttl: seconds a cached copy lives at most. Default 300.

    Example:
        app = Application(plugins=[TokenPolicyPlugin])
        async with app:
            plugin = app.plugins["token-policy"]
            await plugin.update(token_ttl=3600)
            verdict = (await plugin.policy()).check(issued_at, started_at, time.time())
    """

    name = "token-policy"

    def __init__(self, *, store: str | None = None, cache_ttl: float = DEFAULT_CACHE_TTL) -> None:
        if store is not None and (not isinstance(store, str) or not store):
            raise TypeError(f"token-policy: store must be a store name, got {store!r}")
        super().__init__(store=store, cache_ttl=cache_ttl)
        self.store = store
        self.cache_ttl = _seconds("token-policy cache_ttl", cache_ttl)
        self._cache: Cache | None = None

    @property
    def cache(self) -> Cache:
        """The cache holding the policy."""
        if self._cache is None:
            raise StateError("plugin 'token-policy' is not loaded; start the application first")
        return self._cache

    async def load(self) -> None:
        store = self.store
        if store is None and self.app.settings.resolved_cache_url is not None:
            store = "redis"
        self._cache = await self.app.cache_manager.create_cache(name=self.name, store=store)

    async def install(self) -> None:
        await self.db.create_tables(metadata)

    async def policy(self) -> TokenPolicy:
        """The current policy: from the cache, else from the database (defaults if never set)."""
        data = await self.cache.wrap(CACHE_KEY, self._load, self.cache_ttl, lock=True)
        return TokenPolicy.from_dict(data)

    async def read_policy(self) -> TokenPolicy:
        """The policy as committed in the database, bypassing the cache."""
        query = select(token_policies.c.value).where(token_policies.c.app == self.app.name)
        try:
            async with self.db.engine.connect() as connection:
                value = (await connection.execute(query)).scalar_one_or_none()
        except (OperationalError, ProgrammingError) as exc:
            await self._raise_if_no_table(exc)
            raise
        return TokenPolicy() if value is None else TokenPolicy.from_dict(json.loads(value))

    async def update(
        self, *, transaction: Transaction | None = None, **changes: Any
    ) -> TokenPolicy:
        """Change some fields of the policy and return the new policy.

        Once the transaction commits, the cached copy is dropped and the other
        instances are told to drop theirs; a rollback writes and sends nothing.

        Args:
            transaction: join this transaction (the change applies when it
                commits). Default: the transaction open in this task, else a new one.
            **changes: field name -> seconds (`token_ttl`, `session_ttl`, `renew_window`).

        Raises `ValueError`/`TypeError` for an unknown field, a bad value or a
        policy that would be invalid; nothing is written then.
        """
        if transaction is not None and not isinstance(transaction, Transaction):
            raise TypeError(f"update(): transaction must be a Transaction, got {transaction!r}")
        if not changes:
            raise ValueError(f"update() needs at least one of {', '.join(TokenPolicy.fields())}")
        _check_names(changes)
        for field, value in changes.items():
            _seconds(f"token policy {field}", value)
        context = self.db.transaction() if transaction is None else transaction
        try:
            async with context as tx:
                policy = await self._write(tx.connection, changes)
                tx.after_commit(self._forget)
                await self.send_sync_message({"changed": True}, transaction=tx)
        except (OperationalError, ProgrammingError) as exc:
            await self._raise_if_no_table(exc)
            raise
        self.log.debug("token policy (key %s) written: %s", CACHE_KEY, sorted(changes))
        return policy

    async def handle_sync_message(self, message: Any) -> None:
        await self._forget()

    async def on_resync(self) -> None:
        await self._forget()

    async def _load(self) -> dict[str, float]:
        return (await self.read_policy()).to_dict()

    async def _write(self, connection: AsyncConnection, changes: dict[str, Any]) -> TokenPolicy:
        app = self.app.name
        now = datetime.now(UTC)
        # An empty row first, so that the row lock below serializes concurrent updates.
        insert = postgresql.insert if self.db.dialect == "postgresql" else sqlite.insert
        await connection.execute(
            insert(token_policies)
            .values(app=app, value="{}", updated_at=now)
            .on_conflict_do_nothing(index_elements=["app"])
        )
        stored = (
            await connection.execute(
                select(token_policies.c.value).where(token_policies.c.app == app).with_for_update()
            )
        ).scalar_one()
        policy = TokenPolicy.from_dict({**json.loads(stored), **changes})
        await connection.execute(
            token_policies.update()
            .where(token_policies.c.app == app)
            .values(value=json.dumps(policy.to_dict(), sort_keys=True), updated_at=now)
        )
        return policy

    async def _forget(self) -> None:
        # The lock `wrap(lock=True)` holds while it loads and stores: a load that
        # read the old row before the commit stores it before this deletes.
        lock = self.cache.lock_name(CACHE_KEY)
        async with self.app.lock_manager.lock(lock, timeout=LOCK_TIMEOUT):
            await self.cache.delete(CACHE_KEY)
        self.log.info("token policy changed; cached copy (key %s) dropped", CACHE_KEY)

    async def _raise_if_no_table(self, exc: Exception) -> None:
        if await self.db.missing_tables(metadata):
            raise StateError(
                f"plugin 'token-policy': the table {token_policies.name} does not exist; "
                "it is created when the plugin is installed (start an application with it); "
                "if it was dropped, delete the plugin's row from accord_plugins and restart"
            ) from exc
