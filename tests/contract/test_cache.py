"""Cache contract: every method of Cache and CacheManager, run on the memory and Redis stores."""

from __future__ import annotations

import asyncio
import datetime
import logging
import pickle
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from accord import (
    Application,
    CacheError,
    CacheNotFound,
    ConfigError,
    Plugin,
    SerializationError,
    Settings,
    StateError,
)
from accord.cache import MISSING, Cache
from accord.testing import wait_until
from conftest import unique

STORE_PARAMS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("near", id="near", marks=pytest.mark.redis),  # Redis with an in-process L1
]


@pytest.fixture(params=STORE_PARAMS)
def cache_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """One isolated app whose default cache store is the store under test."""
    name = unique("cache")
    extra = {}
    if request.param in ("redis", "near"):
        extra["cache_url"] = request.getfixturevalue("redis_url")
    return Settings(
        app_name=name,
        storage=str(tmp_path),
        pubsub_url=f"memory://{name}",
        queue_url=f"memory://{name}",
        lock_url=f"memory://{name}",
        cache_store="redis" if request.param == "near" else request.param,
        **extra,
    )


@pytest.fixture
async def app(cache_settings: Settings) -> AsyncIterator[Application]:
    async with Application(settings=cache_settings) as app:
        yield app
        await app.cache_manager.flush_all()  # leave nothing behind in the shared Redis


@pytest.fixture
async def cache(app: Application, request: pytest.FixtureRequest) -> Cache:
    near = request.node.callspec.params.get("cache_settings") == "near"
    return await app.cache_manager.create_cache(unique("c"), local=near)


async def test_set_get_roundtrip_every_json_type(cache: Cache) -> None:
    values = {
        "dict": {"a": 1, "nested": {"b": [1, 2.5, None, True, "x"]}},
        "list": [1, "two", {"three": 3}],
        "str": "héllo",
        "int": 2**62,
        "float": 1.25,
        "true": True,
        "false": False,
        "empty": {},
    }
    for key, value in values.items():
        await cache.set(key, value)
    for key, value in values.items():
        assert await cache.get(key) == value
    assert await cache.get("absent") is None
    assert await cache.get("absent", default=7) == 7


async def test_a_stored_none_is_told_apart_from_a_miss_with_missing(cache: Cache) -> None:
    await cache.set("none", None)
    assert await cache.get("none", MISSING) is None
    assert await cache.get("absent", MISSING) is MISSING
    assert not MISSING


async def test_the_value_returned_cannot_change_what_is_cached(cache: Cache) -> None:
    await cache.set("flat", {"a": 1})
    await cache.set("nested", {"a": {"b": [1]}})
    await cache.set("list", [1, 2])
    flat, nested, items = (
        await cache.get("flat"),
        await cache.get("nested"),
        await cache.get("list"),
    )
    flat["a"] = 99
    nested["a"]["b"].append(2)
    items.append(3)
    assert await cache.get("flat") == {"a": 1}
    assert await cache.get("nested") == {"a": {"b": [1]}}
    assert await cache.get("list") == [1, 2]
    deep = {"l1": {"l2": {"l3": [{"l4": [1]}]}}, "flat": [1, 2]}
    records = [{"id": i, "tags": ["a"]} for i in range(30)]  # many containers
    await cache.mset({"deep": deep, "records": records})
    got_deep, got_records = await cache.get("deep"), await cache.get("records")
    got_deep["l1"]["l2"]["l3"][0]["l4"].append(2)
    got_deep["flat"].clear()
    got_records[29]["tags"].append("b")
    assert await cache.get("deep") == deep
    assert await cache.get("records") == records
    rows, many_rows = [{"a": 1}, {"b": [2]}], [{"n": i} for i in range(20)]
    await cache.mset({"rows": rows, "many_rows": many_rows})
    got_rows, got_many_rows = await cache.get("rows"), await cache.get("many_rows")
    got_rows[0]["a"] = 99
    got_rows[1]["b"].append(3)
    got_many_rows[19]["n"] = -1
    assert await cache.mget(["rows", "many_rows"]) == [rows, many_rows]
    original = {"k": [1]}
    await cache.set("copy", original)
    original["k"].append(2)
    assert await cache.get("copy") == {"k": [1]}


async def test_tuples_come_back_as_lists(cache: Cache) -> None:
    await cache.set("t", (1, 2))
    assert await cache.get("t") == [1, 2]


async def test_delete_and_mdel(cache: Cache) -> None:
    await cache.mset({"a": 1, "b": 2, "c": 3})
    await cache.delete("a")
    await cache.delete("never-there")
    assert await cache.get("a") is None
    await cache.mdel(["b", "c", "never-there"])
    await cache.mdel([])
    assert await cache.mget(["a", "b", "c"]) == [None, None, None]


async def test_mset_accepts_a_mapping_or_pairs_and_mget_keeps_order(cache: Cache) -> None:
    await cache.mset({"a": 1, "b": {"x": 2}})
    await cache.mset([("c", [3]), ("d", None)])
    await cache.mset({})
    assert await cache.mget(["d", "missing", "c", "b", "a"]) == [None, None, [3], {"x": 2}, 1]
    assert await cache.mget([]) == []
    with pytest.raises(TypeError, match="single key"):
        await cache.mget("ab")  # type: ignore[arg-type]


async def test_mset_with_ttl_expires_every_key(cache: Cache) -> None:
    await cache.mset({"a": 1, "b": 2}, ttl=0.3)
    ttl = await cache.ttl("a")
    assert isinstance(ttl, float) and 0 < ttl <= 0.3
    await wait_until(lambda: _all_missing(cache, ["a", "b"]), timeout=10)


async def _all_missing(cache: Cache, keys: list[str]) -> bool:
    return await cache.mget(keys) == [None] * len(keys)


async def test_ttl_answers_remaining_seconds_none_or_missing(cache: Cache) -> None:
    await cache.set("forever", 1)
    await cache.set("brief", 1, ttl=30)
    assert await cache.ttl("forever") is None
    remaining = await cache.ttl("brief")
    assert isinstance(remaining, float) and 29 < remaining <= 30
    assert await cache.ttl("absent") is MISSING


async def test_a_key_expires_after_its_ttl(cache: Cache) -> None:
    await cache.set("k", "v", ttl=0.2)
    assert await cache.get("k") == "v"
    await wait_until(lambda: _all_missing(cache, ["k"]), timeout=10)
    assert await cache.ttl("k") is MISSING
    assert "k" not in await cache.keys()


async def test_the_cache_default_ttl_applies_to_writes_without_one(app: Application) -> None:
    cache = await app.cache_manager.create_cache(unique("c"), ttl=60)
    await cache.set("a", 1)
    await cache.set("b", 1, ttl=float("inf"))
    remaining = await cache.ttl("a")
    assert isinstance(remaining, float) and 59 < remaining <= 60
    assert await cache.ttl("b") is None


@pytest.mark.parametrize("bad", [0, -1, float("nan"), "10", True])
async def test_a_ttl_that_is_not_positive_seconds_is_refused(cache: Cache, bad: Any) -> None:
    with pytest.raises(ValueError, match="positive number of seconds"):
        await cache.set("k", 1, ttl=bad)


async def test_keys_lists_this_cache_and_matches_globs(cache: Cache) -> None:
    names = ["user:1", "user:2", "user:10", "post:1", "a*b", "back\\slash", "q?", "x"]
    await cache.mset({name: 1 for name in names})
    assert sorted(await cache.keys()) == sorted(names)
    assert sorted(await cache.keys("user:*")) == ["user:1", "user:10", "user:2"]
    assert sorted(await cache.keys("user:?")) == ["user:1", "user:2"]
    assert sorted(await cache.keys("*:1")) == ["post:1", "user:1"]
    assert sorted(await cache.keys("[pu]*:1")) == ["post:1", "user:1"]
    assert sorted(await cache.keys("[^u]*")) == sorted(["post:1", "a*b", "back\\slash", "q?", "x"])
    assert await cache.keys("a\\*b") == ["a*b"]
    assert await cache.keys("back\\\\slash") == ["back\\slash"]
    assert await cache.keys("q\\?") == ["q?"]
    assert await cache.keys("nothing*") == []


async def test_keys_with_separators_and_escapes_never_collide(app: Application) -> None:
    first = await app.cache_manager.create_cache(unique("c"), prefix="a:b")
    second = await app.cache_manager.create_cache(unique("c"), prefix="a")
    await first.set("c", "first")
    await second.set("b:c", "second")
    await second.set("b\\:c", "third")
    assert await first.get("c") == "first"
    assert await second.get("b:c") == "second"
    assert await second.get("b\\:c") == "third"
    assert await first.keys() == ["c"]
    assert sorted(await second.keys()) == ["b:c", "b\\:c"]
    await first.reset()
    await second.reset()


async def test_reset_empties_one_cache_and_leaves_the_others(app: Application) -> None:
    one = await app.cache_manager.create_cache(unique("c"))
    two = await app.cache_manager.create_cache(unique("c"))
    await one.mset({"a": 1, "b": 2})
    await two.mset({"a": 10, "c": 30})
    await one.reset()
    assert await one.keys() == []
    assert await one.get("a") is None
    assert sorted(await two.keys()) == ["a", "c"]
    assert await two.get("a") == 10


async def test_incr_and_incrby_count_from_zero(cache: Cache) -> None:
    assert await cache.incr("n") == 1
    assert await cache.incr("n") == 2
    assert await cache.incrby("n", 10) == 12
    assert await cache.incrby("n", -20) == -8
    assert await cache.get("n") == -8
    await cache.set("preset", 41)
    assert await cache.incr("preset") == 42


async def test_incr_sets_the_ttl_only_when_it_creates_the_key(cache: Cache) -> None:
    await cache.incr("n", ttl=30)
    await cache.incrby("n", 5, ttl=1000)
    remaining = await cache.ttl("n")
    assert isinstance(remaining, float) and remaining <= 30
    await cache.set("plain", 1)
    await cache.incr("plain", ttl=30)
    assert await cache.ttl("plain") is None


async def test_incr_on_a_non_integer_is_a_cache_error(cache: Cache) -> None:
    await cache.set("s", "text")
    await cache.set("f", 1.5)
    for key in ("s", "f"):
        with pytest.raises(CacheError, match=repr(key)):
            await cache.incr(key)
    with pytest.raises(TypeError):
        await cache.incrby("n", 1.5)  # type: ignore[arg-type]


async def test_100_concurrent_increments_count_100(cache: Cache) -> None:
    results = await asyncio.gather(*(cache.incr("hits") for _ in range(100)))
    assert sorted(results) == list(range(1, 101))
    assert await cache.get("hits") == 100


async def test_object_helpers_set_get_and_delete_one_field(cache: Cache) -> None:
    await cache.set_value_in_object("o", "a", 1)
    await cache.set_value_in_object("o", "b", {"deep": [1]})
    assert await cache.get("o") == {"a": 1, "b": {"deep": [1]}}
    assert await cache.get_value_in_object("o", "b") == {"deep": [1]}
    assert await cache.get_value_in_object("o", "zzz") is None
    assert await cache.get_value_in_object("absent", "a") is None
    await cache.del_value_in_object("o", "a")
    await cache.del_value_in_object("o", "not-a-field")
    await cache.del_value_in_object("absent", "a")
    assert await cache.get("o") == {"b": {"deep": [1]}}
    assert await cache.get("absent", MISSING) is MISSING


async def test_object_helpers_keep_the_ttl_of_an_existing_object(cache: Cache) -> None:
    await cache.set("o", {"a": 1}, ttl=30)
    await cache.set_value_in_object("o", "b", 2)
    remaining = await cache.ttl("o")
    assert isinstance(remaining, float) and remaining <= 30


async def test_object_helpers_refuse_a_value_that_is_not_an_object(cache: Cache) -> None:
    await cache.set("list", [1])
    with pytest.raises(CacheError, match="'list' holds a list, not an object"):
        await cache.set_value_in_object("list", "a", 1)
    with pytest.raises(CacheError, match="not an object"):
        await cache.get_value_in_object("list", "a")
    with pytest.raises(SerializationError):
        await cache.set_value_in_object("o", "a", object())
    assert await cache.get("o", MISSING) is MISSING


async def test_concurrent_object_updates_lose_no_field(cache: Cache) -> None:
    await asyncio.gather(*(cache.set_value_in_object("o", f"f{i}", i) for i in range(50)))
    assert await cache.get("o") == {f"f{i}": i for i in range(50)}


async def test_an_unencodable_value_names_the_key_and_the_type(cache: Cache) -> None:
    with pytest.raises(SerializationError, match=r"'k'.*type object"):
        await cache.set("k", object())
    with pytest.raises(SerializationError, match="'when'.*datetime"):
        await cache.set("when", {"at": datetime.datetime.now()})
    with pytest.raises(SerializationError, match="'bad'"):
        await cache.mset({"good": 1, "bad": {1, 2}})
    assert await cache.mget(["k", "when", "good", "bad"]) == [None] * 4


async def test_a_key_must_be_a_string(cache: Cache) -> None:
    with pytest.raises(TypeError, match="strings"):
        await cache.set(1, "v")  # type: ignore[arg-type]
    for key in (1, b"k", ["k"]):
        with pytest.raises(TypeError, match="strings"):
            await cache.get(key)  # type: ignore[arg-type]


async def test_planted_pickle_reads_as_a_miss_and_runs_nothing(
    cache: Cache, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker, proof = tmp_path / "pwned", tmp_path / "proof"
    # The payload is live: unpickling its twin creates a file.
    pickle.loads(_pickle_creating(proof)).close()
    assert proof.exists()
    planted = await _plant(cache, "planted", _pickle_creating(marker))
    with caplog.at_level(logging.WARNING, logger="accord.cache"):
        assert await cache.get("planted") is None
        assert await cache.get("planted", MISSING) is MISSING
        assert await cache.mget(["planted"]) == [None]
        assert await cache.wrap("planted", lambda: "fresh") == "fresh"
    assert not marker.exists()
    if planted:
        assert "'planted'" in caplog.text and "not JSON" in caplog.text
    assert await cache.get("planted") == "fresh"


class _OpenFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def _pickle_creating(path: Path) -> bytes:
    return pickle.dumps(_OpenFile(path))


async def _plant(cache: Cache, key: str, data: bytes) -> bool:
    """Write raw bytes under a cache key, bypassing the cache, as another program would.

    Redis takes them. Nothing outside the process can write to a memory store,
    and the store itself refuses bytes that are not JSON: False then.
    """
    store: Any = getattr(cache.store, "remote", cache.store)  # a near cache: its Redis
    if hasattr(store, "url"):
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(store.url)
        try:
            await client.set(store.key(key), data)
        finally:
            await client.aclose()
        return True
    with pytest.raises(ValueError):
        store.put(key, data, None)
    return False


async def test_app_cache_is_the_default_cache_named_after_the_app(app: Application) -> None:
    assert app.cache is app.cache_manager.default
    assert app.cache.name == app.name
    assert app.cache_manager.get_cache(app.name) is app.cache
    assert app.cache.store.__class__.__name__.lower().startswith(app.settings.cache_store)
    await app.cache.set("k", 1)
    assert await app.cache.get("k") == 1


async def test_create_cache_replaces_a_cache_of_the_same_name(app: Application) -> None:
    name = unique("c")
    first = await app.cache_manager.create_cache(name, prefix="p1")
    second = await app.cache_manager.create_cache(name, prefix="p2")
    assert first is not second
    assert app.cache_manager.get_cache(name) is second
    with pytest.raises(CacheNotFound, match="nope"):
        app.cache_manager.get_cache("nope")
    await first.reset()


async def test_flush_all_resets_every_cache(app: Application) -> None:
    one = await app.cache_manager.create_cache(unique("c"))
    two = await app.cache_manager.create_cache(unique("c"))
    await one.set("a", 1)
    await two.set("b", 2)
    await app.cache.set("c", 3)
    await app.cache_manager.flush_all()
    assert await one.keys() == await two.keys() == await app.cache.keys() == []


async def test_unknown_store_or_option_is_a_config_error(app: Application) -> None:
    with pytest.raises(ConfigError, match="unknown store 'nope'.*memory, redis"):
        await app.cache_manager.create_cache("x", store="nope")
    with pytest.raises(ConfigError, match="does not accept"):
        await app.cache_manager.create_cache("x", store="memory", fail_open=True)
    with pytest.raises(ConfigError, match="in-process already"):
        await app.cache_manager.create_cache("x", store="memory", local=True)


async def test_register_store_plugs_in_a_new_store(app: Application) -> None:
    from accord.adapters.memory.cache import MemoryStore

    made: list[dict[str, Any]] = []

    def factory(**kwargs: Any) -> MemoryStore:
        made.append(kwargs)
        return MemoryStore(max=kwargs.get("size", 10))

    app.cache_manager.register_store("tiny", factory)
    cache = await app.cache_manager.create_cache("t", prefix="p", store="tiny", size=3)
    await cache.mset({str(i): i for i in range(5)})
    assert sorted(await cache.keys()) == ["2", "3", "4"]
    assert made[0]["namespace"] == f"{app.name}:p" and made[0]["size"] == 3


async def test_memory_store_evicts_the_least_recently_used_at_max(tmp_path: Path) -> None:
    async with Application(settings=Settings(app_name=unique("c"), storage=str(tmp_path))) as app:
        cache = await app.cache_manager.create_cache("lru", max=3)
        await cache.mset({"a": 1, "b": 2, "c": 3})
        assert await cache.get("a") == 1  # a is now the most recently used
        await cache.set("d", 4)
        assert sorted(await cache.keys()) == ["a", "c", "d"]
        assert await cache.get("b") is None
        assert len(app.cache_manager.get_cache("lru").store) == 3  # type: ignore[arg-type]
        default = await app.cache_manager.create_cache("big")
        await default.mset({str(i): i for i in range(2500)})
        assert len(await default.keys()) == 2000


async def test_a_cache_is_usable_from_a_plugins_load_hook(cache_settings: Settings) -> None:
    seen: dict[str, Any] = {}

    class Loader(Plugin):
        name = "loader"

        async def load(self) -> None:
            await self.app.cache.set("from-load", {"ok": True})
            own = await self.app.cache_manager.create_cache("own")
            await own.set("k", 1)
            seen["load"] = await self.app.cache.get("from-load")

    async with Application(settings=cache_settings, plugins=[Loader]) as app:
        assert seen["load"] == {"ok": True}
        assert await app.cache_manager.get_cache("own").get("k") == 1
        await app.cache_manager.flush_all()


async def test_caches_refuse_use_after_the_app_stops(cache_settings: Settings) -> None:
    app = Application(settings=cache_settings)
    async with app:
        cache = await app.cache_manager.create_cache("c")
        await cache.set("k", 1)
        await cache.reset()
    with pytest.raises(StateError, match="closed"):
        await cache.get("k")
    with pytest.raises(StateError, match="closed"):
        await app.cache_manager.create_cache("again")


async def test_a_bad_default_store_fails_the_start(tmp_path: Path) -> None:
    settings = Settings(app_name=unique("c"), storage=str(tmp_path), cache_store="redis")
    with pytest.raises(ConfigError, match="ACCORD_CACHE_URL or ACCORD_CLUSTER_URL"):
        await Application(settings=settings).start()
    unknown = settings.replace(cache_store="nope")
    with pytest.raises(ConfigError, match="unknown store 'nope'"):
        await Application(settings=unknown).start()


async def test_the_default_cache_is_closed_with_the_app(tmp_path: Path) -> None:
    app = Application(settings=Settings(app_name=unique("c"), storage=str(tmp_path)))
    async with app:
        pass
    with pytest.raises(StateError, match="stopped"):
        await app.cache.get("k")
