"""RedisLockAdapter: PX leases holding token and owner, Lua compare-and-delete/extend/hand-over."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError

from ..._keys import glob_escape
from ...config import redact
from ...exceptions import AdapterUnavailable, StateError
from .._lock_waiters import MAX_SLEEP, Waiter, Waiters
from .._watchdog import Watchdog
from ._autopipeline import AutoPipeline
from ._client import map_errors
from ._lock_wakeups import RedisWakeups

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["RedisLockAdapter"]

PREFIX = "accord:lock:"
#: One fencing counter for every lock in the Redis database (see `ACQUIRE`).
FENCE = "accord:lock-fence"
#: While a process waits for key K, its attempts keep WAITING + K alive this long (ms),
#: and a release announces itself only then. Longer than a head ever sleeps.
WAITING = "accord:lock-waiting:"
WAITING_MS = 5000
#: Seconds one command may take before the server counts as unreachable.
COMMAND_TIMEOUT = 10.0
#: Keys asked for per SCAN call (and read per script call) by `holders`.
SCAN_COUNT = 500

# A lock key's value is "<token>:<owner>": the token is digits only, so the
# first ":" ends it. `held` is that value; the owner is what follows the ":"
# (a value without one is compared whole).
_OWNED_BY = "string.sub(held, (string.find(held, ':', 1, true) or 0) + 1) == ARGV[1]"

# The fencing token is a hybrid clock: the Redis server's time in microseconds,
# or the last token + 1 if that is not smaller. It rises while the counter key
# lives, and after a restart that lost the counter (no persistence, an old
# snapshot, an eviction) the clock is already past every token handed out,
# since at most one token per microsecond is issued.
_NEXT_TOKEN = """
local now = redis.call('TIME')
local token = tonumber(now[1]) * 1000000 + tonumber(now[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if last >= token then token = last + 1 end
token = string.format('%.0f', token)
redis.call('SET', KEYS[2], token)
"""

ACQUIRE = f"""
if redis.call('EXISTS', KEYS[1]) == 0 then
  {_NEXT_TOKEN}
  redis.call('SET', KEYS[1], token .. ':' .. ARGV[1], 'PX', ARGV[2])
  return {{1, token}}
end
redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
return {{0, redis.call('PTTL', KEYS[1])}}
"""

# Release straight to the next waiter of the same process: a new owner, lease
# and token in one step, without a moment where the key is free.
TRANSFER = f"""
local held = redis.call('GET', KEYS[1])
if held and {_OWNED_BY} then
  {_NEXT_TOKEN}
  redis.call('SET', KEYS[1], token .. ':' .. ARGV[2], 'PX', ARGV[3])
  return token
end
return false
"""

# Announced only when someone waits: a PUBLISH is not free on a busy server.
RELEASE = f"""
local held = redis.call('GET', KEYS[1])
if held and {_OWNED_BY} then
  redis.call('DEL', KEYS[1])
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('PUBLISH', ARGV[2], '')
  end
  return 1
end
return 0
"""

EXTEND = f"""
local held = redis.call('GET', KEYS[1])
if held and {_OWNED_BY} then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# Value and time left of each key still alive with a lease, read at one instant.
READ = """
local found = {}
for _, name in ipairs(KEYS) do
  local held = redis.pcall('GET', name)
  if type(held) == 'string' then
    local left = redis.call('PTTL', name)
    if left > 0 then
      found[#found + 1] = name
      found[#found + 1] = held
      found[#found + 1] = left
    end
  end
end
return found
"""


class RedisLockAdapter:
    """Locks in Redis: one key per held lock, waiters woken through pub/sub.

    Without a `client`, commands go over an auto-pipelined connection of its
    own: redis-py's per-command machinery (pool checkout, retries, parsing)
    costs more than the round trip itself on a local server.

    Args:
        url: `redis://` or `rediss://` URL.
        client: a ready `redis.asyncio.Redis` to use. Default: a connection of its own.
        command_timeout: seconds one command may take before Redis counts as
            unreachable (`AdapterUnavailable`). Default 10.
    """

    def __init__(
        self,
        url: str,
        *,
        client: aioredis.Redis | None = None,
        command_timeout: float = COMMAND_TIMEOUT,
    ) -> None:
        self.url = url
        self._watchdog = Watchdog(command_timeout)
        self._client = client
        self._pipe: AutoPipeline | None = None
        self._scripts: dict[str, _Script] = {}
        self._execute: Callable[..., Awaitable[Any]] | None = None
        self._waiters = Waiters()
        self._wakeups = RedisWakeups(url, self._waiters)

    def __repr__(self) -> str:
        return f"<RedisLockAdapter {redact(self.url)!r}>"

    @staticmethod
    def name(key: str) -> str:
        """The Redis key of a lock."""
        return PREFIX + key

    async def connect(self) -> None:
        execute: Callable[..., Awaitable[Any]]
        if self._client is not None:
            execute = self._client.execute_command
        else:
            # Not shared with other adapters: a server that stops answering
            # drops this socket after the lock's own command timeout. The
            # watchdog bounds each call, with one timer for all.
            if self._pipe is None:
                self._pipe = AutoPipeline(self.url, reply_timeout=self._watchdog.timeout)
            execute = self._pipe.send
        self._execute = execute
        for script_name, source in (
            ("acquire", ACQUIRE),
            ("release", RELEASE),
            ("extend", EXTEND),
            ("transfer", TRANSFER),
            ("read", READ),
        ):
            self._scripts[script_name] = _Script(execute, source)
        await self._bounded(execute("PING"))

    async def close(self) -> None:
        await self._wakeups.close()
        self._watchdog.close()
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            await pipe.close()

    async def abort(self) -> None:
        await self.close()

    async def acquire(
        self, key: str, owner: str, ttl: float, timeout: float | None = 0
    ) -> int | None:
        keys = [self.name(key), FENCE, WAITING + key]
        args = [owner, _ms(ttl), WAITING_MS]
        script = self._scripts["acquire"]

        async def attempt() -> tuple[int | None, float | None]:
            taken, value = await self._run(script, keys, args)
            if taken:
                return int(value), None
            pttl = int(value)
            # -1: a key without expiry (not ours); poll it rather than spin.
            return None, (pttl / 1000 if pttl >= 0 else MAX_SLEEP)

        return await self._waiters.acquire(
            key, attempt, timeout, self._wakeups.listen, owner=owner, ttl=ttl
        )

    async def release(self, key: str, owner: str) -> bool:
        head = self._waiters.successor(key)
        if head is None:
            return await self._release(key, owner)
        # Shielded: once the key is handed over, the new owner must learn it.
        return await asyncio.shield(self._hand_over(key, owner, head))

    async def _release(self, key: str, owner: str) -> bool:
        keys = [self.name(key), WAITING + key]
        args = [owner, self._wakeups.channel(key)]
        return bool(await self._run(self._scripts["release"], keys, args))

    async def _hand_over(self, key: str, owner: str, head: Waiter) -> bool:
        args = [owner, head.owner, _ms(head.ttl)]
        token = await self._run(self._scripts["transfer"], [self.name(key), FENCE], args)
        if token is None:
            return False
        if not self._waiters.deliver(head, int(token)):
            # The waiter gave up meanwhile: free the key it was given.
            await self._release(key, head.owner)
        return True

    async def extend(self, key: str, owner: str, ttl: float) -> bool:
        args = [owner, _ms(ttl)]
        return bool(await self._run(self._scripts["extend"], [self.name(key)], args))

    async def holders(self, prefix: str) -> list[tuple[str, str, int, float]]:
        if self._execute is None:
            raise StateError(f"{self!r} is not connected")
        # SCAN may return a key twice; a key gone by the time it is read is skipped.
        match = glob_escape(self.name(prefix)) + "*"
        cut = len(PREFIX)
        found: dict[str, tuple[str, str, int, float]] = {}
        cursor: bytes | str = "0"
        while True:
            cursor, names = await self._bounded(
                self._execute("SCAN", cursor, "MATCH", match, "COUNT", SCAN_COUNT)
            )
            if names:
                reply = await self._run(self._scripts["read"], list(names), [])
                for start in range(0, len(reply), 3):
                    name, held, left = reply[start : start + 3]
                    token, _, owner = _text(held).partition(":")
                    if token.isdigit():
                        key = _text(name)[cut:]
                        found[key] = (key, owner, int(token), int(left) / 1000)
            if cursor in (b"0", "0", 0):
                return list(found.values())

    async def _run(self, script: _Script, keys: Sequence[str | bytes], args: list[Any]) -> Any:
        return await self._bounded(script(keys, args))

    async def _bounded(self, command: Awaitable[Any]) -> Any:
        try:
            return await self._watchdog.run(command)
        except TimeoutError as exc:
            raise AdapterUnavailable(
                f"Redis at {redact(self.url)} did not answer within {self._watchdog.timeout:g} s"
            ) from exc
        except Exception:
            # Translated only on failure: the success path stays cheap.
            with map_errors(self.url):
                raise


class _Script:
    """A Lua script run by its SHA1, loaded again when the server lost it (a restart)."""

    def __init__(self, execute: Callable[..., Awaitable[Any]], source: str) -> None:
        self._execute = execute
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, keys: Sequence[str | bytes], args: list[Any]) -> Any:
        # EVALSHA straight through: redis-py's Script object costs about a
        # fifth of the round trip on every call.
        try:
            return await self._execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self._execute("SCRIPT", "LOAD", self.source)
            return await self._execute("EVALSHA", self.sha, len(keys), *keys, *args)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
