"""Lock throughput per adapter, beside redis-py's asyncio Lock and PostgreSQL advisory locks, in one run.

Run: .venv/bin/python bench/lock.py [--seconds S] [--rounds N] [--systems a,b]

Uncontended: one coroutine taking and releasing one key back to back, as
acquire/release pairs (accord's `acquire()` + `release()`: a lease without
renewal) and, for accord, as `async with lock()` blocks (renewal armed).
Contended: 2 processes x 10 coroutines on one key, empty critical section,
completed acquire+release cycles per second (the local adapter, in-process by
nature, runs 1 process x 20 coroutines). Every system is set up once; the
measurements are interleaved in rounds and each cell is the median round, so
a change in machine load hits every system alike. Writes bench/results/lock.json.
"""
# ruff: noqa: E402 - the path fix below must run before the imports

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where a sibling named
# after a stdlib module (such as a `queue.py`) would shadow it for redis-py.
_HERE = Path(__file__).parent.resolve()
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.asyncio.lock import Lock as RedisPyLock

from accord import Application, Settings

REDIS_URL = os.environ.get("ACCORD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "ACCORD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
RESULTS = _HERE / "results" / "lock.json"
SYSTEMS = ["local", "redis", "redis-py", "redis-py-10ms", "postgres", "advisory"]
ACCORD = ("local", "redis", "postgres")
PROCESSES = 2
COROUTINES = 10
TTL = 30.0
TARGET_UNCONTENDED = 1.0
TARGET_CONTENDED = 1.5

LABELS = {
    "local": "accord local",
    "redis": "accord redis",
    "redis-py": "redis-py Lock (sleep=0.1, default)",
    "redis-py-10ms": "redis-py Lock (sleep=0.01)",
    "postgres": "accord postgresql",
    "advisory": "asyncpg pg_advisory_lock",
}

# A system under test: `pair(key)` takes and releases `key` once.
Pair = Callable[[str], Awaitable[None]]


@asynccontextmanager
async def system(name: str, schema: str, app_name: str) -> AsyncIterator[dict[str, Pair]]:
    """Set up one system; yields its acquire+release functions ("pair", and "block" for accord)."""
    if name in ACCORD:
        url = {
            "local": f"memory://{app_name}",
            "redis": REDIS_URL,
            "postgres": f"{POSTGRES_URL}?search_path={schema}",
        }[name]
        with tempfile.TemporaryDirectory(prefix="accord-bench-") as folder:
            settings = Settings(
                app_name=app_name, storage=folder, lock_url=url, pubsub_url=f"memory://{app_name}"
            )
            async with Application(settings=settings) as app:
                manager = app.lock_manager

                async def pair(key: str) -> None:
                    release = await manager.acquire(key, ttl=TTL)
                    await release()

                async def block(key: str) -> None:
                    async with manager.lock(key, ttl=TTL):
                        pass

                yield {"pair": pair, "block": block}
    elif name in ("redis-py", "redis-py-10ms"):
        client = aioredis.Redis.from_url(REDIS_URL)
        sleep = 0.1 if name == "redis-py" else 0.01

        async def redis_py(key: str) -> None:
            lock = RedisPyLock(client, f"{app_name}:{key}", timeout=TTL, sleep=sleep)
            await lock.acquire()
            await lock.release()

        try:
            yield {"pair": redis_py}
        finally:
            await client.aclose()
    elif name == "advisory":
        pool = await asyncpg.create_pool(POSTGRES_URL, min_size=COROUTINES, max_size=COROUTINES)
        base = random.randrange(1 << 40)

        async def advisory(key: str) -> None:
            number = base + sum(key.encode()) % 1000
            async with pool.acquire() as connection:
                await connection.execute("SELECT pg_advisory_lock($1)", number)
                await connection.execute("SELECT pg_advisory_unlock($1)", number)

        try:
            yield {"pair": advisory}
        finally:
            await pool.close()
    else:
        raise SystemExit(f"unknown system {name!r}; use one of {', '.join(SYSTEMS)}")


async def run_for(pair: Pair, key: str, seconds: float, coroutines: int) -> tuple[int, float]:
    """Completed pairs by `coroutines` coroutines within `seconds`, and the time taken."""
    started = time.monotonic()
    deadline = started + seconds
    counts = [0] * coroutines

    async def loop(index: int) -> None:
        while time.monotonic() < deadline:
            await pair(key)
            counts[index] += 1

    await asyncio.gather(*(loop(i) for i in range(coroutines)))
    return sum(counts), time.monotonic() - started


class Workers:
    """The processes that contend for one system's key; each round starts on "go"."""

    def __init__(self, name: str, processes: list[asyncio.subprocess.Process]) -> None:
        self.name = name
        self.processes = processes

    @classmethod
    async def start(cls, name: str, schema: str, app_name: str) -> Workers:
        options = json.dumps({"system": name, "schema": schema, "app": app_name})
        processes = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--worker",
                options,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            for _ in range(PROCESSES)
        ]
        for process in processes:
            if await read(process) != {"ready": True}:
                raise SystemExit(f"a {name} worker failed to start")
        return cls(name, processes)

    async def round(self, seconds: float) -> float:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(f"{seconds}\n".encode())
            await process.stdin.drain()
        results = [await read(process) for process in self.processes]
        return sum(r["count"] for r in results) / max(r["elapsed"] for r in results)

    async def stop(self) -> None:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.close()
            await process.wait()


async def read(process: asyncio.subprocess.Process) -> Any:
    assert process.stdout is not None
    line = await process.stdout.readline()
    if not line:
        raise SystemExit("a worker exited early")
    return json.loads(line)


async def worker(options: dict[str, Any]) -> None:
    async with system(options["system"], options["schema"], options["app"]) as pairs:
        await pairs["pair"]("warm-up")
        print(json.dumps({"ready": True}), flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            count, elapsed = await run_for(pairs["pair"], "k", float(line), COROUTINES)
            print(json.dumps({"count": count, "elapsed": elapsed}), flush=True)


async def main(seconds: float, rounds: int, systems: list[str]) -> None:
    schema = f"accord_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(POSTGRES_URL)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    samples: dict[tuple[str, str], list[float]] = {}
    try:
        async with AsyncExitStack() as stack:
            print("setting up ...", file=sys.stderr, flush=True)
            pairs = {
                name: await stack.enter_async_context(
                    system(name, schema, f"bench{uuid.uuid4().hex[:8]}")
                )
                for name in systems
            }
            workers: dict[str, Workers] = {}
            for name in systems:
                if name != "local":
                    workers[name] = await Workers.start(
                        name, schema, f"bench{uuid.uuid4().hex[:8]}"
                    )
                    stack.push_async_callback(workers[name].stop)
            for name in systems:
                await run_for(pairs[name]["pair"], "k", 0.2, 1)  # warm-up
            per_round = seconds / rounds
            order = list(systems)
            for number in range(rounds):
                print(f"round {number + 1}/{rounds} ...", file=sys.stderr, flush=True)
                random.shuffle(order)  # no system always runs first, or after another
                for name in order:
                    for kind, pair in pairs[name].items():
                        cpu = time.process_time()
                        count, elapsed = await run_for(pair, "k", per_round, 1)
                        samples.setdefault((name, kind), []).append(count / elapsed)
                        if kind == "pair":
                            used = (time.process_time() - cpu) / count * 1e6
                            samples.setdefault((name, "cpu"), []).append(used)
                    if name == "local":
                        count, elapsed = await run_for(
                            pairs[name]["pair"], "k", per_round, PROCESSES * COROUTINES
                        )
                        rate = count / elapsed
                    else:
                        rate = await workers[name].round(per_round)
                    samples.setdefault((name, "contended"), []).append(rate)
    finally:
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.close()
    rows = {
        name: {
            kind: (statistics.median(samples[name, kind]) if (name, kind) in samples else None)
            for kind in ("pair", "cpu", "block", "contended")
        }
        for name in systems
    }
    report(rows, seconds, rounds, {f"{n}/{k}": v for (n, k), v in samples.items()})


def report(
    rows: dict[str, dict[str, float | None]],
    seconds: float,
    rounds: int,
    samples: dict[str, list[float]],
) -> None:
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}"

    print(
        f"\nlock throughput, acquire+release pairs/s: median of {rounds} rounds, "
        f"{seconds:g} s per cell, {os.cpu_count()} CPUs\n"
    )
    print(
        f"{'system':<38} {'uncontended':>12} {'client CPU':>11} "
        f"{'lock() block':>13} {'contended':>10}"
    )
    print(f"{'':<38} {'pairs/s':>12} {'us/pair':>11} {'pairs/s':>13} {'pairs/s':>10}")
    for name, row in rows.items():
        print(
            f"{LABELS[name]:<38} {cell(row['pair']):>12} {cell(row['cpu']):>11} "
            f"{cell(row['block']):>13} {cell(row['contended']):>10}"
        )
    ratios: dict[str, float] = {}
    if "redis" in rows and "redis-py" in rows:
        ours, theirs = rows["redis"], rows["redis-py"]
        if ours["pair"] and theirs["pair"] and ours["contended"] and theirs["contended"]:
            ratios["redis_uncontended_vs_redis_py"] = ours["pair"] / theirs["pair"]
            ratios["redis_contended_vs_redis_py"] = ours["contended"] / theirs["contended"]
            if ours["cpu"] and theirs["cpu"]:
                ratios["redis_py_cpu_per_pair_vs_redis"] = theirs["cpu"] / ours["cpu"]
            print(
                "\naccord redis vs redis-py Lock: "
                f"uncontended x{ratios['redis_uncontended_vs_redis_py']:.2f} "
                f"(target >= {TARGET_UNCONTENDED}), "
                f"contended x{ratios['redis_contended_vs_redis_py']:.2f} "
                f"(target >= {TARGET_CONTENDED}); redis-py spends "
                f"x{ratios.get('redis_py_cpu_per_pair_vs_redis', float('nan')):.2f} "
                "the client CPU per uncontended pair"
            )
    RESULTS.parent.mkdir(exist_ok=True)
    document = {
        "unit": "acquire+release pairs per second (median round); cpu: client microseconds per pair",
        "seconds_per_cell": seconds,
        "rounds": rounds,
        "contended": f"{PROCESSES} processes x {COROUTINES} coroutines, one key",
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "labels": LABELS,
        "results": rows,
        "ratios": ratios,
        "samples": {key: [round(value) for value in values] for key, values in samples.items()},
        "targets": {
            "redis_uncontended_vs_redis_py": TARGET_UNCONTENDED,
            "redis_contended_vs_redis_py": TARGET_CONTENDED,
        },
    }
    RESULTS.write_text(json.dumps(document, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.5, help="seconds per cell, all rounds")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per cell")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(worker(json.loads(args.worker)))
    else:
        asyncio.run(main(args.seconds, args.rounds, args.systems.split(",")))
