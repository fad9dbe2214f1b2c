"""A lock-holding process for the fault tests: the checker's worker, the paused holder, its contender.

Usage: python lock_worker.py MODE '{"json": "options"}'; settings come from ACCORD_* variables.
Every event is one JSON line on stdout.

- checker: waits for "go" on stdin, then runs `calls` run_exclusive calls over
  `coroutines` coroutines, each a non-atomic read-modify-write of a PostgreSQL
  counter row; writes every hold (key, acquired/released monotonic_ns, token)
  to the file `out`.
- holder: holds `key` with `ttl` and writes its token to a fenced row, then
  waits; when its lease is lost it reports it and tries a stale fenced write.
- contender: waits for `key`, writes its token to the fenced row, holds it for
  `hold` seconds.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import time
from typing import Any

import asyncpg

from accord import Application, LockLostError, Settings

FENCED_WRITE = "UPDATE fenced SET token = $2, writer = $3 WHERE key = $1 AND token < $2"


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def checker(app: Application, db: asyncpg.Pool, options: dict[str, Any]) -> None:
    keys: list[str] = options["keys"]
    calls: int = options["calls"]
    coroutines: int = options["coroutines"]
    holds: list[tuple[str, int, int, int]] = []
    manager = app.lock_manager

    async def one(key: str) -> None:
        acquired = time.monotonic_ns()
        token = next(lock.fencing_token for lock in manager.held if lock.key == key)
        value = await db.fetchval("SELECT value FROM counters WHERE key = $1", key)
        await asyncio.sleep(0)  # let another coroutine run between read and write
        await db.execute("UPDATE counters SET value = $2 WHERE key = $1", key, value + 1)
        holds.append((key, acquired, time.monotonic_ns(), token))

    async def loop(index: int, count: int) -> None:
        for call in range(count):
            key = keys[(index + call) % len(keys)]
            await manager.run_exclusive(key, functools.partial(one, key), ttl=10)

    shares = [calls // coroutines + (1 if i < calls % coroutines else 0) for i in range(coroutines)]
    emit("ready")
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await asyncio.gather(*(loop(index, count) for index, count in enumerate(shares)))
    with open(options["out"], "w") as out:
        json.dump(holds, out)
    emit("done", holds=len(holds))


async def holder(app: Application, db: asyncpg.Pool, options: dict[str, Any]) -> None:
    key, ttl = options["key"], options["ttl"]
    token = 0
    try:
        async with app.lock_manager.lock(key, ttl=ttl) as lock:
            token = lock.fencing_token
            rows = await fenced_write(db, key, token, "holder")
            emit("holding", token=token, rows=rows)
            await asyncio.sleep(60)
            emit("finished")
    except LockLostError as exc:
        emit("lost", message=str(exc), at=time.monotonic_ns())
        # A write that was already on its way when the lease ran out.
        emit("stale_write", rows=await fenced_write(db, key, token, "holder"))


async def contender(app: Application, db: asyncpg.Pool, options: dict[str, Any]) -> None:
    key, ttl = options["key"], options["ttl"]
    emit("waiting")
    async with app.lock_manager.lock(key, ttl=ttl, timeout=60) as lock:
        emit("acquired", token=lock.fencing_token, at=time.monotonic_ns())
        emit("wrote", rows=await fenced_write(db, key, lock.fencing_token, "contender"))
        await asyncio.sleep(options["hold"])
    emit("released")


async def fenced_write(db: asyncpg.Pool, key: str, token: int, writer: str) -> int:
    status = await db.execute(FENCED_WRITE, key, token, writer)
    return int(status.split()[-1])


MODES = {"checker": checker, "holder": holder, "contender": contender}


async def main(mode: str, options: dict[str, Any]) -> None:
    app = Application(settings=Settings.from_env())
    db = await asyncpg.create_pool(options["db"], min_size=1, max_size=options.get("pool", 10))
    try:
        async with app:
            await MODES[mode](app, db, options)
    finally:
        await db.close()


# Helpers for the tests (imported by test_lock_*.py).


async def spawn(
    mode: str, options: dict[str, Any], env: dict[str, str]
) -> asyncio.subprocess.Process:
    """Start one worker process in `mode`; its stdin (the checker's "go"), stdout and stderr are pipes."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        mode,
        json.dumps(options),
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
