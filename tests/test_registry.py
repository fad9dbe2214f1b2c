"""Adapter lookup by scheme, lazy imports and the missing-dependency error."""

from __future__ import annotations

import sys

import pytest

from accord import ConfigError, MissingDependency
from accord._registry import load_adapter, require, scheme_of

TABLE = {
    "memory": "collections:OrderedDict",
    "redis": "accord.adapters.redis._client:new_client",
}


def test_scheme_of_urls_and_bare_words() -> None:
    assert scheme_of("redis://127.0.0.1:6379/0") == "redis"
    assert scheme_of("REDISS://host") == "rediss"
    assert scheme_of("local") == "local"
    assert scheme_of("memory://bus") == "memory"


def test_load_adapter_imports_only_what_is_used() -> None:
    from collections import OrderedDict

    assert load_adapter(TABLE, "memory://", setting="ACCORD_X") is OrderedDict


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(
        ConfigError, match="ACCORD_X: unknown scheme 'nats'; use one of: memory, redis"
    ):
        load_adapter(TABLE, "nats://127.0.0.1", setting="ACCORD_X")


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in sys.modules if name.startswith("accord.adapters.redis")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(MissingDependency, match=r"ACCORD_X: .*pip install 'accord\[redis\]'"):
        load_adapter(TABLE, "redis://127.0.0.1", setting="ACCORD_X")


def test_require_returns_the_module_or_explains() -> None:
    assert require("json", feature="tests").dumps([]) == "[]"
    with pytest.raises(MissingDependency, match="pip install 'accord\\[no_such_driver\\]'"):
        require("no_such_driver", feature="a test")
