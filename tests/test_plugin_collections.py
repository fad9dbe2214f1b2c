"""The collections plugin: schema in memory on every instance, synced after commit, changes under a lock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import func, select

from accord import Application, PluginError, SerializationError, Settings
from accord.plugins.collection_manager import (
    Collection,
    CollectionNotFound,
    CollectionsPlugin,
    DuplicateNameError,
    Field,
    collections_table,
    fields_table,
    metadata,
)
from accord.testing import cluster, wait_until
from conftest import unique

WAIT = 15.0


class Recording(CollectionsPlugin):
    """The plugin, recording the sync messages it handles."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.received: list[Any] = []

    async def handle_sync_message(self, message: Any) -> None:
        self.received.append(message)
        await super().handle_sync_message(message)


def plugin(app: Application) -> Recording:
    return cast(Recording, app.plugins["collections"])


def names_everywhere(apps: list[Application], collection: str) -> list[tuple[str, ...] | None]:
    """Each instance's field names of `collection` (None where it does not exist)."""
    found = [plugin(app).get(collection) for app in apps]
    return [None if item is None else item.field_names for item in found]


async def settle(
    apps: list[Application], collection: str, expected: tuple[str, ...] | None
) -> None:
    await wait_until(
        lambda: names_everywhere(apps, collection) == [expected] * len(apps),
        timeout=WAIT,
        message=f"instances disagree on {collection!r}: {names_everywhere(apps, collection)}",
    )


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def cluster_args(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """How to start the cluster: memory defaults, Redis, or PostgreSQL for everything."""
    name = unique("col")
    if request.param == "memory":
        return {"name": name}
    if request.param == "redis":
        return {"name": name, "url": request.getfixturevalue("redis_url")}
    url: str = request.getfixturevalue("postgres_url")
    db_url = url.replace("postgresql://", "postgresql+asyncpg://", 1)
    return {
        "settings": Settings(app_name=name, storage=str(tmp_path), db_url=db_url, cluster_url=url)
    }


@pytest.fixture
async def apps(cluster_args: dict[str, Any]) -> AsyncIterator[list[Application]]:
    async with cluster(3, plugins=[Recording], **cluster_args) as started:
        yield started


@pytest.fixture
async def local_apps() -> AsyncIterator[list[Application]]:
    async with cluster(3, plugins=[Recording], name=unique("col")) as started:
        yield started


async def test_a_created_collection_reaches_every_instance(apps: list[Application]) -> None:
    fields = [Field("title", "string", {"required": True}), Field("views", "integer")]
    created = await plugin(apps[0]).create_collection("posts", fields, title="Posts")

    # The instance that made the change has it as soon as the call returns.
    assert plugin(apps[0]).collections["posts"] == created
    await settle(apps, "posts", ("title", "views"))
    for app in apps:
        posts = plugin(app).collections["posts"]
        assert posts.options == {"title": "Posts"}
        assert posts.fields[0] == Field("title", "string", {"required": True})
    assert all(plugin(app).received == [{"collection": "posts"}] for app in apps[1:])
    assert plugin(apps[0]).received == []


async def test_added_and_removed_fields_and_dropped_collections_propagate(
    apps: list[Application],
) -> None:
    await plugin(apps[0]).create_collection("posts", [Field("title", "string")])
    await settle(apps, "posts", ("title",))

    added = await plugin(apps[1]).add_field("posts", "views", "integer", default=0)
    assert added == Field("views", "integer", {"default": 0})
    await plugin(apps[2]).add_field("posts", "body", "string")
    await settle(apps, "posts", ("title", "views", "body"))
    assert plugin(apps[0]).collections["posts"].fields[1].options == {"default": 0}

    assert await plugin(apps[2]).remove_field("posts", "views") is True
    await settle(apps, "posts", ("title", "body"))
    assert await plugin(apps[0]).remove_field("posts", "views") is False

    assert await plugin(apps[0]).drop_collection("posts") is True
    await settle(apps, "posts", None)
    assert await plugin(apps[1]).drop_collection("posts") is False
    assert all("posts" not in plugin(app).collections for app in apps)


async def test_concurrent_adds_of_one_field_leave_exactly_one(apps: list[Application]) -> None:
    await plugin(apps[0]).create_collection("posts", [Field("title", "string")])
    await settle(apps, "posts", ("title",))

    results = await asyncio.gather(
        *(plugin(app).add_field("posts", "slug", "string") for app in apps),
        return_exceptions=True,
    )

    assert sum(isinstance(result, Field) for result in results) == 1
    errors = [result for result in results if isinstance(result, BaseException)]
    assert len(errors) == 2
    assert all(isinstance(error, DuplicateNameError) for error in errors), errors
    assert all("already has a field 'slug'" in str(error) for error in errors)
    await settle(apps, "posts", ("title", "slug"))
    async with apps[0].db.engine.connect() as connection:
        copies = await connection.scalar(
            select(func.count())
            .select_from(fields_table)
            .where(fields_table.c.app == apps[0].name, fields_table.c.name == "slug")
        )
    assert copies == 1


async def test_concurrent_creates_of_one_collection_leave_exactly_one(
    apps: list[Application],
) -> None:
    results = await asyncio.gather(
        *(
            plugin(app).create_collection("tags", [Field(f"from_{i}", "string")])
            for i, app in enumerate(apps)
        ),
        return_exceptions=True,
    )

    winners = [result for result in results if isinstance(result, Collection)]
    assert len(winners) == 1
    assert all(isinstance(r, DuplicateNameError) for r in results if r is not winners[0])
    await settle(apps, "tags", winners[0].field_names)


async def test_concurrent_removes_of_one_field_remove_it_once(apps: list[Application]) -> None:
    fields = [Field("title", "string"), Field("draft", "boolean")]
    await plugin(apps[0]).create_collection("posts", fields)
    await settle(apps, "posts", ("title", "draft"))

    results = await asyncio.gather(*(plugin(app).remove_field("posts", "draft") for app in apps))

    assert sorted(results) == [False, False, True]
    await settle(apps, "posts", ("title",))


async def test_a_rolled_back_create_sends_nothing_and_changes_nothing(
    apps: list[Application],
) -> None:
    with pytest.raises(RuntimeError, match="changed my mind"):
        async with apps[0].db.transaction() as tx:
            await plugin(apps[0]).create_collection("ghost", [Field("x", "json")], transaction=tx)
            assert plugin(apps[0]).get("ghost") is None  # not before the commit
            raise RuntimeError("changed my mind")
    assert plugin(apps[0]).get("ghost") is None

    # Messages from one instance arrive in commit order: once "after" is seen, a
    # message about "ghost" would have been handled already.
    await plugin(apps[0]).create_collection("after")
    await settle(apps, "after", ())
    assert all(plugin(app).received == [{"collection": "after"}] for app in apps[1:])
    assert names_everywhere(apps, "ghost") == [None, None, None]
    async with apps[0].db.engine.connect() as connection:
        rows = await connection.scalar(
            select(func.count())
            .select_from(collections_table)
            .where(collections_table.c.app == apps[0].name, collections_table.c.name == "ghost")
        )
    assert rows == 0


async def test_a_field_added_in_the_callers_transaction_lands_with_its_commit(
    apps: list[Application],
) -> None:
    await plugin(apps[0]).create_collection("posts", [Field("title", "string")])
    await settle(apps, "posts", ("title",))

    async with apps[1].db.transaction() as tx:
        await plugin(apps[1]).add_field("posts", "score", "float", transaction=tx)
        assert plugin(apps[1]).collections["posts"].field_names == ("title",)

    assert plugin(apps[1]).collections["posts"].field_names == ("title", "score")
    await settle(apps, "posts", ("title", "score"))


async def test_a_restarted_instance_loads_the_schema(apps: list[Application]) -> None:
    await plugin(apps[0]).create_collection(
        "posts", [Field("title", "string"), Field("meta", "json", {"default": {}})]
    )
    await plugin(apps[1]).create_collection("users", [Field("email", "string")])
    await plugin(apps[2]).add_field("users", "joined", "datetime")
    await settle(apps, "users", ("email", "joined"))

    async with Application(plugins=[Recording], settings=apps[0].settings) as restarted:
        assert dict(plugin(restarted).collections) == dict(plugin(apps[0]).collections)
        assert plugin(restarted).collections["posts"].fields[1].options == {"default": {}}


async def test_the_very_first_start_creates_the_tables_and_a_later_change_is_seen(
    tmp_path: Path,
) -> None:
    settings = Settings(app_name=unique("col"), storage=str(tmp_path / "fresh"))
    async with Application(plugins=[Recording], settings=settings) as app:
        assert plugin(app).collections == {}
        await plugin(app).create_collection("posts")
        assert list(plugin(app).collections) == ["posts"]


async def test_missing_tables_after_install_are_a_clear_error(tmp_path: Path) -> None:
    settings = Settings(app_name=unique("col"), storage=str(tmp_path / "dropped"))
    app = Application(plugins=[Recording], settings=settings)
    async with app, app.db.engine.begin() as connection:
        await connection.run_sync(metadata.drop_all)

    with pytest.raises(PluginError, match="'collections'.*accord_collection") as caught:
        async with Application(plugins=[Recording], settings=settings):
            pass
    assert caught.value.plugin == "collections"


async def test_on_resync_reloads_everything_from_the_database(
    local_apps: list[Application],
) -> None:
    apps = local_apps
    await plugin(apps[0]).create_collection("posts", [Field("title", "string")])
    await settle(apps, "posts", ("title",))
    # A change this instance never heard about, written behind its back.
    async with apps[0].db.engine.begin() as connection:
        await connection.execute(
            collections_table.insert().values(app=apps[0].name, name="missed", options={})
        )
        await connection.execute(fields_table.delete().where(fields_table.c.app == apps[0].name))

    await plugin(apps[1]).on_resync()

    assert names_everywhere(apps[1:2], "missed") == [()]
    assert names_everywhere(apps[1:2], "posts") == [()]


async def test_bad_input_is_refused_and_nothing_is_written(local_apps: list[Application]) -> None:
    apps = local_apps
    tool = plugin(apps[0])
    await tool.create_collection("posts", [Field("title", "string")])

    with pytest.raises(ValueError, match="not valid"):
        await tool.create_collection("1posts")
    with pytest.raises(ValueError, match="not valid"):
        await tool.create_collection("x" * 64)
    with pytest.raises(ValueError, match="not valid"):
        await tool.create_collection("")
    with pytest.raises(TypeError, match="must be a str"):
        await tool.create_collection(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown type 'text'; use one of boolean, datetime"):
        await tool.add_field("posts", "body", "text")
    with pytest.raises(SerializationError, match="options of field 'body'"):
        await tool.add_field("posts", "body", "string", default={1, 2})
    with pytest.raises(TypeError, match="fields must be Field objects"):
        await tool.create_collection("tags", ["name"])  # type: ignore[list-item]
    with pytest.raises(DuplicateNameError, match="two fields named 'a'"):
        await tool.create_collection("tags", [Field("a", "string"), Field("a", "integer")])
    with pytest.raises(DuplicateNameError, match="collection 'posts' already exists"):
        await tool.create_collection("posts")
    with pytest.raises(DuplicateNameError, match="already has a field 'title'"):
        await tool.add_field("posts", "title", "integer")
    with pytest.raises(CollectionNotFound, match="no collection named 'nope'"):
        await tool.add_field("nope", "title", "string")
    with pytest.raises(CollectionNotFound, match="no collection named 'nope'"):
        await tool.remove_field("nope", "title")

    await settle(apps, "posts", ("title",))
    assert all(list(plugin(app).collections) == ["posts"] for app in apps)
    assert plugin(apps[0]).collections["posts"].fields == (Field("title", "string"),)
    assert all(plugin(app).received == [{"collection": "posts"}] for app in apps[1:])
