"""Token policy plugin: one policy per app in the database, read through the cache, the same everywhere."""

from __future__ import annotations

import asyncio
import math
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from accord import Application, Settings, StateError
from accord.adapters.memory.cache import MemoryStore
from accord.adapters.redis.cache import RedisStore
from accord.plugins.token_policy import TokenPolicy, TokenPolicyPlugin
from accord.testing import cluster, wait_until
from conftest import unique

DEFAULTS = TokenPolicy()


def counting() -> type[TokenPolicyPlugin]:
    """A plugin class that counts database loads and sync messages over all its instances."""

    class Counting(TokenPolicyPlugin):
        loads = 0
        messages: list[str] = []

        async def read_policy(self) -> TokenPolicy:
            type(self).loads += 1
            return await super().read_policy()

        async def handle_sync_message(self, message: Any) -> None:
            await super().handle_sync_message(message)
            type(self).messages.append(self.app.instance_id)

    return Counting


def plugins_of(apps: list[Application]) -> list[TokenPolicyPlugin]:
    plugins = [app.plugins["token-policy"] for app in apps]
    assert all(isinstance(plugin, TokenPolicyPlugin) for plugin in plugins)
    return plugins  # type: ignore[return-value]


def memory_settings(tmp_path: Path, db_url: str) -> Settings:
    bus = f"memory://{unique('tp')}"
    return Settings(
        app_name=unique("tp"),
        storage=str(tmp_path / "storage"),
        db_url=db_url,
        pubsub_url=bus,
        queue_url=bus,
        lock_url=bus,
    )


# The policy itself.


@pytest.mark.parametrize(
    ("now", "verdict"),
    [
        (1000, "valid"),  # at issue
        (1099.5, "valid"),
        (1100, "renew"),  # token_ttl reached: renewable from this instant
        (1109.5, "renew"),
        (1110, "expired"),  # renew window over
        (900, "valid"),  # a clock behind the issuer's
    ],
)
def test_check_token_edges(now: float, verdict: str) -> None:
    policy = TokenPolicy(token_ttl=100, session_ttl=1000, renew_window=10)
    assert policy.check(issued_at=1000, session_started_at=500, now=now) == verdict


@pytest.mark.parametrize(
    ("now", "verdict"),
    [
        (1499.5, "renew"),  # token expired at 1450, session still open
        (1500, "expired"),  # the session is over: no renewal, whatever the window
        (1500.5, "expired"),
    ],
)
def test_check_session_edges(now: float, verdict: str) -> None:
    policy = TokenPolicy(token_ttl=100, session_ttl=1000, renew_window=100)
    assert policy.check(issued_at=1350, session_started_at=500, now=now) == verdict


def test_check_a_valid_token_expires_with_its_session() -> None:
    policy = TokenPolicy(token_ttl=100, session_ttl=100, renew_window=50)
    assert policy.check(issued_at=0, session_started_at=0, now=99) == "valid"
    assert policy.check(issued_at=0, session_started_at=0, now=100) == "expired"


def test_check_rejects_bad_times() -> None:
    policy = TokenPolicy()
    with pytest.raises(ValueError, match="before its session started"):
        policy.check(issued_at=10, session_started_at=20, now=30)
    with pytest.raises(ValueError, match="now must be a finite number"):
        policy.check(issued_at=10, session_started_at=10, now=math.nan)
    with pytest.raises(TypeError, match="issued_at"):
        policy.check(issued_at="10", session_started_at=10, now=30)  # type: ignore[arg-type]


def test_policy_defaults_and_round_trip() -> None:
    assert DEFAULTS.to_dict() == {"token_ttl": 86400, "session_ttl": 604800, "renew_window": 900}
    policy = TokenPolicy(token_ttl=60, session_ttl=60)
    assert TokenPolicy.from_dict(policy.to_dict()) == policy
    assert TokenPolicy.from_dict({"renew_window": 5}) == TokenPolicy(renew_window=5)


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"token_ttl": 0}, ValueError, "token_ttl must be a positive, finite number"),
        ({"renew_window": -1}, ValueError, "renew_window must be a positive"),
        ({"session_ttl": math.inf}, ValueError, "session_ttl must be a positive, finite"),
        ({"token_ttl": math.nan}, ValueError, "token_ttl must be a positive"),
        ({"token_ttl": "3600"}, TypeError, "token_ttl must be a number of seconds, got str"),
        ({"renew_window": True}, TypeError, "got bool"),
        ({"token_ttl": 3600, "session_ttl": 60}, ValueError, "session_ttl .* must be at least"),
    ],
)
def test_policy_validation(fields: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        TokenPolicy(**fields)


def test_from_dict_names_unknown_fields() -> None:
    with pytest.raises(ValueError, match="unknown token policy field.*'ttl'.*token_ttl"):
        TokenPolicy.from_dict({"ttl": 60})


def test_plugin_options_are_checked() -> None:
    with pytest.raises(ValueError, match="cache_ttl"):
        TokenPolicyPlugin(cache_ttl=0)
    with pytest.raises(TypeError, match="store name"):
        TokenPolicyPlugin(store="")


# On a memory cluster: per-instance caches, dropped through sync messages.


async def test_memory_cluster_update_reaches_every_instance() -> None:
    async with cluster(3, plugins=[TokenPolicyPlugin]) as apps:
        plugins = plugins_of(apps)
        assert all(isinstance(plugin.cache.store, MemoryStore) for plugin in plugins)
        assert [await plugin.policy() for plugin in plugins] == [DEFAULTS] * 3

        updated = await plugins[0].update(token_ttl=3600, renew_window=60)

        assert updated == TokenPolicy(token_ttl=3600, renew_window=60)
        assert await plugins[0].policy() == updated
        for plugin in plugins[1:]:
            await wait_until(partial(_reads, plugin, updated))
        assert await plugins[2].read_policy() == updated


async def _reads(plugin: TokenPolicyPlugin, expected: TokenPolicy) -> bool:
    return await plugin.policy() == expected


async def test_update_keeps_other_fields() -> None:
    async with cluster(1, plugins=[TokenPolicyPlugin]) as apps:
        (plugin,) = plugins_of(apps)
        await plugin.update(token_ttl=600)
        assert await plugin.update(renew_window=30) == TokenPolicy(token_ttl=600, renew_window=30)
        assert await plugin.policy() == TokenPolicy(token_ttl=600, renew_window=30)


async def test_rollback_changes_nothing_and_sends_nothing(tmp_path: Path, db_url: str) -> None:
    plugin_class = counting()
    async with cluster(
        3, plugins=[plugin_class], settings=memory_settings(tmp_path, db_url)
    ) as apps:
        plugins = plugins_of(apps)
        assert [await plugin.policy() for plugin in plugins] == [DEFAULTS] * 3

        with pytest.raises(RuntimeError, match="changed my mind"):
            async with apps[0].db.transaction() as tx:
                await plugins[0].update(token_ttl=60, transaction=tx)
                raise RuntimeError("changed my mind")

        assert await plugins[0].read_policy() == DEFAULTS
        assert await plugins[0].cache.get("policy") == DEFAULTS.to_dict()
        # The next committed change is the first message the others receive.
        await plugins[0].update(token_ttl=120)
        await wait_until(lambda: len(plugin_class.messages) == 2)
        assert sorted(plugin_class.messages) == sorted(app.instance_id for app in apps[1:])
        for plugin in plugins:
            await wait_until(partial(_reads, plugin, TokenPolicy(token_ttl=120)))


async def test_update_in_callers_transaction_applies_at_commit(tmp_path: Path, db_url: str) -> None:
    async with cluster(
        2, plugins=[TokenPolicyPlugin], settings=memory_settings(tmp_path, db_url)
    ) as apps:
        plugins = plugins_of(apps)
        async with apps[0].db.transaction() as tx:
            await tx.connection.execute(text("select 1"))
            assert await plugins[0].update(session_ttl=86400, transaction=tx) == TokenPolicy(
                session_ttl=86400
            )
            # Not committed yet: every instance still reads (and caches) the old policy.
            assert await plugins[0].policy() == DEFAULTS
            assert await plugins[1].policy() == DEFAULTS
        assert await plugins[0].policy() == TokenPolicy(session_ttl=86400)
        await wait_until(partial(_reads, plugins[1], TokenPolicy(session_ttl=86400)))


async def test_concurrent_updates_of_different_fields_both_land(
    tmp_path: Path, db_url: str
) -> None:
    async with cluster(
        2, plugins=[TokenPolicyPlugin], settings=memory_settings(tmp_path, db_url)
    ) as apps:
        plugins = plugins_of(apps)
        await asyncio.gather(
            plugins[0].update(token_ttl=600),
            plugins[1].update(renew_window=30),
            plugins[0].update(session_ttl=100_000),
        )
        expected = TokenPolicy(token_ttl=600, session_ttl=100_000, renew_window=30)
        assert await plugins[1].read_policy() == expected
        for plugin in plugins:
            await wait_until(partial(_reads, plugin, expected))


async def test_each_application_has_its_own_policy(tmp_path: Path, db_url: str) -> None:
    settings = memory_settings(tmp_path, db_url)
    async with (
        cluster(1, plugins=[TokenPolicyPlugin], settings=settings) as first,
        cluster(1, plugins=[TokenPolicyPlugin], settings=settings, name=unique("tp")) as second,
    ):
        await plugins_of(first)[0].update(token_ttl=60)
        assert await plugins_of(second)[0].policy() == DEFAULTS
        assert await plugins_of(first)[0].policy() == TokenPolicy(token_ttl=60)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({}, ValueError, "at least one of token_ttl"),
        ({"bogus": 1}, ValueError, "unknown token policy field.*'bogus'"),
        ({"token_ttl": -5}, ValueError, "token_ttl must be a positive"),
        ({"token_ttl": None}, TypeError, "token_ttl must be a number of seconds"),
        ({"session_ttl": 3600}, ValueError, r"session_ttl \(3600 s\) must be at least"),
        ({"transaction": "tx"}, TypeError, "must be a Transaction"),
    ],
)
async def test_bad_update_writes_nothing(
    changes: dict[str, Any], error: type[Exception], match: str
) -> None:
    async with cluster(1, plugins=[TokenPolicyPlugin]) as apps:
        (plugin,) = plugins_of(apps)
        with pytest.raises(error, match=match):
            await plugin.update(**changes)
        assert await plugin.read_policy() == DEFAULTS
        async with apps[0].db.engine.connect() as connection:
            rows = await connection.execute(text("select count(*) from accord_token_policy"))
            assert rows.scalar_one() == 0


async def test_missing_table_is_a_clear_error() -> None:
    async with cluster(1, plugins=[TokenPolicyPlugin]) as apps:
        (plugin,) = plugins_of(apps)
        async with apps[0].db.engine.begin() as connection:
            await connection.execute(text("drop table accord_token_policy"))
        with pytest.raises(StateError, match="'token-policy'.*accord_token_policy does not exist"):
            await plugin.read_policy()
        with pytest.raises(StateError, match="accord_token_policy does not exist"):
            await plugin.update(token_ttl=60)


async def test_using_the_plugin_before_start_is_a_state_error() -> None:
    with pytest.raises(StateError, match="not loaded"):
        await TokenPolicyPlugin().policy()


# On a Redis cluster: one shared cache.


@pytest.mark.redis
async def test_redis_cluster_update_is_read_everywhere_at_once(redis_url: str) -> None:
    async with cluster(3, plugins=[TokenPolicyPlugin], url=redis_url, name=unique("tp")) as apps:
        plugins = plugins_of(apps)
        assert all(isinstance(plugin.cache.store, RedisStore) for plugin in plugins)
        assert [await plugin.policy() for plugin in plugins] == [DEFAULTS] * 3

        updated = await plugins[0].update(token_ttl=1800, session_ttl=3600)

        assert [await plugin.policy() for plugin in plugins] == [updated] * 3
        assert updated == TokenPolicy(token_ttl=1800, session_ttl=3600)


@pytest.mark.redis
async def test_redis_cold_cache_loads_once_in_the_cluster(redis_url: str) -> None:
    plugin_class = counting()
    async with cluster(3, plugins=[plugin_class], url=redis_url, name=unique("tp")) as apps:
        plugins = plugins_of(apps)
        await plugins[0].update(renew_window=120)
        plugin_class.loads = 0
        await wait_until(lambda: len(plugin_class.messages) == 2)
        assert await plugins[0].cache.get("policy") is None  # cold

        results = await asyncio.gather(*(plugin.policy() for plugin in plugins for _ in range(20)))

        assert results == [TokenPolicy(renew_window=120)] * 60
        assert plugin_class.loads == 1
