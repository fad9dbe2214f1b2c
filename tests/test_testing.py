"""The in-process cluster harness and its fault helpers."""

from __future__ import annotations

import pytest

from accord import AppState, Plugin, PluginError
from accord.testing import cluster, stop_abruptly, wait_until


class Counter(Plugin):
    name = "counter"
    stops = 0

    async def after_stop(self) -> None:
        type(self).stops += 1


async def test_cluster_starts_and_stops_n_apps_with_distinct_ids() -> None:
    async with cluster(3, plugins=[Counter], name="trio") as apps:
        assert len(apps) == 3
        assert len({app.instance_id for app in apps}) == 3
        assert all(app.state is AppState.STARTED and app.name == "trio" for app in apps)
        assert len({id(app.plugins["counter"]) for app in apps}) == 3
        # One shared database for the cluster, as instances behind a load balancer have.
        assert len({app.settings.resolved_db_url for app in apps}) == 1
    assert all(app.state is AppState.STOPPED for app in apps)


async def test_two_clusters_do_not_share_a_bus() -> None:
    async with cluster(1) as first, cluster(1) as second:
        assert first[0].settings.resolved_pubsub_url != second[0].settings.resolved_pubsub_url


async def test_stop_abruptly_skips_the_graceful_hooks() -> None:
    Counter.stops = 0
    async with cluster(2, plugins=[Counter]) as apps:
        await stop_abruptly(apps[0])
        assert apps[0].state is AppState.STOPPED
        assert Counter.stops == 0
    assert Counter.stops == 1  # only the instance that stopped gracefully


async def test_cluster_needs_plugin_classes() -> None:
    with pytest.raises(PluginError, match="needs plugin classes"):
        async with cluster(2, plugins=[Counter()]):  # type: ignore[list-item]
            pass


async def test_wait_until_polls_sync_and_async_predicates() -> None:
    state = {"n": 0}

    def bump() -> bool:
        state["n"] += 1
        return state["n"] >= 3

    await wait_until(bump, timeout=1)

    async def never() -> bool:
        return False

    with pytest.raises(TimeoutError, match="not ready"):
        await wait_until(never, timeout=0.05, message="not ready")
