"""Server-side names: escaped segments come back exactly, and escaped prefixes match only themselves."""

from __future__ import annotations

import asyncpg
import pytest

from accord._keys import join, like_escape, unescape

AWKWARD = ["plain", "a:b", "a\\:b", "a\\", "\\", ":", "::", "\\\\:", "%", "_", "a%b_c\\d", "é:ü"]


@pytest.mark.parametrize("key", AWKWARD)
def test_a_joined_key_comes_back_after_the_prefix(key: str) -> None:
    prefix = join("app", "")
    name = join("app", key)
    assert name.startswith(prefix)
    assert unescape(name[len(prefix) :]) == key


@pytest.mark.parametrize("name", ["a:b", "a\\", "a\\x", join("a", "b")])
def test_a_name_that_is_not_one_escaped_segment_unescapes_to_none(name: str) -> None:
    assert unescape(name) is None


def test_like_escape_escapes_each_metacharacter() -> None:
    assert like_escape("a%b_c\\d") == "a\\%b\\_c\\\\d"
    assert like_escape("plain-name.1") == "plain-name.1"


@pytest.mark.postgres
async def test_an_escaped_prefix_matches_only_itself_in_postgres(postgres_url: str) -> None:
    connection = await asyncpg.connect(postgres_url)
    try:
        for prefix in ["x_y:", "x%:", "x\\:", "x\\\\y:"]:
            pattern = like_escape(prefix) + "%"
            candidates = [prefix + "k", prefix, "xay:k", "x:k", "xzz:k", "x\\y:k", "x"]
            matched = [
                name
                for name in candidates
                if await connection.fetchval("SELECT $1::text LIKE $2 ESCAPE '\\'", name, pattern)
            ]
            assert matched == [name for name in candidates if name.startswith(prefix)], prefix
    finally:
        await connection.close()
