"""Pub/sub throughput and latency per adapter, beside raw redis-py pub/sub, measured in one run.

Run: .venv/bin/python bench/pubsub.py [--count N] [--paced-count N] [--systems a,b] [--modes a,b]

One publisher process and one subscriber process per measurement (the
memory adapter, which is in-process by nature, runs both in one process).
Modes: `burst` (one coroutine publishing back to back), `flood` (16
concurrent publishers) and `paced` (1,000 msg/s from one coroutine).
Latency is publish call -> handler call, on the machine's monotonic clock,
which every process shares. Burst and flood send 20,000 messages; paced
sends 10,000 (10 s per system) so that one run stays near three minutes.
Writes bench/results/pubsub.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where a sibling
# benchmark named like a standard module (bench/queue.py) would shadow it.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse
import asyncio
import json
import os
import platform
import subprocess
import tempfile
import time
import uuid
from typing import Any

import orjson

REDIS_URL = os.environ.get("ACCORD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "ACCORD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
AMQP_URL = os.environ.get("ACCORD_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
RESULTS = Path(__file__).with_name("results") / "pubsub.json"
CHANNEL = "bench"
SYSTEMS = ["raw-redis", "redis", "postgres", "rabbitmq", "memory"]
MODES = {"burst": 1, "flood": 16, "paced": 1}
PACE = 1 / 1000
IDLE_TIMEOUT = 15.0
TARGET_FLOOD_RATIO = 1.5
TARGET_PACED_P99_MS = 1.0


def now() -> float:
    return time.monotonic()


def message(seq: int) -> dict[str, Any]:
    return {"seq": seq, "t": now(), "kind": "bench"}


# Publishing: `send` is one publish call of the system under test.


async def publish_all(send: Any, mode: str, count: int) -> float:
    """Publish `count` messages the way `mode` says; returns the start time."""
    workers = MODES[mode]
    started = now()
    if mode == "paced":
        for seq in range(count):
            delay = started + seq * PACE - now()
            if delay > 0:
                await asyncio.sleep(delay)
            await send(message(seq))
        return started

    async def worker(first: int) -> None:
        for seq in range(first, count, workers):
            await send(message(seq))

    await asyncio.gather(*(worker(k) for k in range(workers)))
    return started


class Receiver:
    """Records the latency of every message and when the last one arrived."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.latencies: list[float] = []
        self.last = 0.0
        self.done = asyncio.Event()

    async def __call__(self, payload: dict[str, Any]) -> None:
        self.last = now()
        self.latencies.append(self.last - payload["t"])
        if len(self.latencies) >= self.count:
            self.done.set()

    async def wait(self) -> None:
        seen = -1
        while not self.done.is_set() and len(self.latencies) != seen:
            seen = len(self.latencies)
            try:
                await asyncio.wait_for(self.done.wait(), IDLE_TIMEOUT)
            except TimeoutError:
                pass

    def result(self) -> dict[str, Any]:
        return {"latencies": self.latencies, "last": self.last}


# accord apps.


def accord_app(url: str, name: str) -> Any:
    from accord import Application, Settings

    storage = tempfile.mkdtemp(prefix="accord-bench-")
    return Application(
        settings=Settings(
            app_name=name,
            storage=storage,
            pubsub_url=url,
            queue_url=f"memory://{name}",
            lock_url=f"memory://{name}",
        )
    )


async def accord_subscriber(url: str, name: str, count: int) -> dict[str, Any]:
    receiver = Receiver(count)
    async with accord_app(url, name) as app:
        await app.pub_sub_manager.subscribe(CHANNEL, receiver)
        print("ready", flush=True)
        await receiver.wait()
    return receiver.result()


async def accord_publisher(url: str, name: str, mode: str, count: int) -> dict[str, Any]:
    async with accord_app(url, name) as app:
        publish = app.pub_sub_manager.publish
        started = await publish_all(lambda m: publish(CHANNEL, m), mode, count)
        return {"started": started, "finished": now()}


async def memory_both(name: str, mode: str, count: int) -> dict[str, Any]:
    receiver = Receiver(count)
    url = f"memory://{name}"
    async with accord_app(url, name) as sub, accord_app(url, name) as pub:
        await sub.pub_sub_manager.subscribe(CHANNEL, receiver)
        publish = pub.pub_sub_manager.publish
        started = await publish_all(lambda m: publish(CHANNEL, m), mode, count)
        await receiver.wait()
    return {**receiver.result(), "started": started}


# Raw redis-py, written the way its documentation shows.


async def raw_subscriber(url: str, name: str, count: int) -> dict[str, Any]:
    import redis.asyncio as aioredis

    receiver = Receiver(count)
    client = aioredis.Redis.from_url(url)
    pubsub = client.pubsub()
    await pubsub.subscribe(f"{name}:{CHANNEL}")
    await pubsub.get_message(timeout=5)  # the subscribe confirmation
    print("ready", flush=True)

    async def listen() -> None:
        async for item in pubsub.listen():
            if item["type"] == "message":
                await receiver(orjson.loads(item["data"]))

    task = asyncio.create_task(listen())
    await receiver.wait()
    task.cancel()
    await pubsub.aclose()
    await client.aclose()
    return receiver.result()


async def raw_publisher(url: str, name: str, mode: str, count: int) -> dict[str, Any]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    channel = f"{name}:{CHANNEL}"

    async def send(payload: dict[str, Any]) -> None:
        await client.publish(channel, orjson.dumps(payload))

    started = await publish_all(send, mode, count)
    finished = now()
    await client.aclose()
    return {"started": started, "finished": finished}


# Orchestration.


def url_of(system: str, schema: str | None) -> str:
    if system in ("redis", "raw-redis"):
        return REDIS_URL
    if system == "postgres":
        return f"{POSTGRES_URL}?search_path={schema}"
    return AMQP_URL


def role_main(args: argparse.Namespace) -> None:
    raw = args.system == "raw-redis"
    if args.role == "sub":
        runner = raw_subscriber if raw else accord_subscriber
        out = asyncio.run(runner(args.url, args.name, args.count))
    elif args.role == "pub":
        publisher = raw_publisher if raw else accord_publisher
        out = asyncio.run(publisher(args.url, args.name, args.mode, args.count))
    else:
        out = asyncio.run(memory_both(args.name, args.mode, args.count))
    print("result " + json.dumps(out), flush=True)


def run_role(role: str, system: str, mode: str, count: int, url: str, name: str) -> Any:
    command = [sys.executable, __file__, "--role", role, "--system", system, "--mode", mode]
    command += ["--count", str(count), "--url", url, "--name", name]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def read_result(process: Any) -> dict[str, Any]:
    out, _ = process.communicate(timeout=300)
    for line in out.splitlines():
        if line.startswith("result "):
            result: dict[str, Any] = json.loads(line[len("result ") :])
            return result
    raise RuntimeError(f"no result from {process.args}: exit {process.returncode}")


def measure(
    system: str, mode: str, count: int, schema: str | None, exchanges: list[str]
) -> dict[str, Any]:
    name = f"bench{uuid.uuid4().hex[:8]}"
    if system == "rabbitmq":
        exchanges.append(f"accord.pubsub.{name}")
    if system == "memory":
        result = read_result(run_role("both", system, mode, count, "memory://", name))
        started = result["started"]
    else:
        url = url_of(system, schema)
        sub = run_role("sub", system, mode, count, url, name)
        assert sub.stdout is not None
        line = sub.stdout.readline()
        if line.strip() != "ready":
            sub.kill()
            raise RuntimeError(f"{system} subscriber did not start: {line!r}")
        published = read_result(run_role("pub", system, mode, count, url, name))
        result = read_result(sub)
        started = published["started"]
    latencies = sorted(result["latencies"])
    delivered = len(latencies)
    elapsed = max(result["last"] - started, 1e-9)
    return {
        "system": system,
        "mode": mode,
        "sent": count,
        "delivered": delivered,
        "msgs_per_s": delivered / elapsed if delivered else 0.0,
        "p50_ms": 1000 * latencies[delivered // 2] if delivered else None,
        "p99_ms": 1000 * latencies[min(delivered - 1, int(delivered * 0.99))]
        if delivered
        else None,
    }


async def create_schema() -> str:
    import asyncpg

    schema = f"accord_bench_{uuid.uuid4().hex[:8]}"
    connection = await asyncpg.connect(POSTGRES_URL)
    await connection.execute(f'CREATE SCHEMA "{schema}"')
    await connection.close()
    return schema


async def drop_schema(schema: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(POSTGRES_URL)
    await connection.execute(f'DROP SCHEMA "{schema}" CASCADE')
    await connection.close()


async def drop_exchanges(names: list[str]) -> None:
    """The RabbitMQ adapter's per-app exchanges outlive the run; remove the ones it made."""
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    for name in names:
        await channel.exchange_delete(name)
    await connection.close()


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    raw = {r["mode"]: r["msgs_per_s"] for r in rows if r["system"] == "raw-redis"}
    header = f"{'system':<10} {'mode':<6} {'delivered':>11} {'msgs/s':>10} {'vs raw':>7} {'p50 ms':>9} {'p99 ms':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        base = raw.get(r["mode"])
        ratio = f"{r['msgs_per_s'] / base:.2f}x" if base else "-"
        r["ratio_vs_raw"] = r["msgs_per_s"] / base if base else None
        print(
            f"{r['system']:<10} {r['mode']:<6} {r['delivered']:>5}/{r['sent']:<5} "
            f"{r['msgs_per_s']:>10,.0f} {ratio:>7} {fmt(r['p50_ms']):>9} {fmt(r['p99_ms']):>9}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="messages per burst/flood run")
    parser.add_argument("--paced-count", type=int, default=10_000, help="messages per paced run")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--role", choices=["sub", "pub", "both"], help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        role_main(args)
        return

    systems = [s for s in args.systems.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    schema = asyncio.run(create_schema()) if "postgres" in systems else None
    rows: list[dict[str, Any]] = []
    exchanges: list[str] = []
    began = time.monotonic()
    try:
        for mode in modes:
            count = args.paced_count if mode == "paced" else args.count
            for system in systems:
                row = measure(system, mode, count, schema, exchanges)
                rows.append(row)
                print(
                    f"  {system:<10} {mode:<6} {row['msgs_per_s']:>10,.0f} msgs/s  "
                    f"p99 {fmt(row['p99_ms'])} ms",
                    flush=True,
                )
    finally:
        if schema is not None:
            asyncio.run(drop_schema(schema))
        if exchanges:
            asyncio.run(drop_exchanges(exchanges))
    print()
    print_table(rows)
    flood = {r["system"]: r for r in rows if r["mode"] == "flood"}
    paced = {r["system"]: r for r in rows if r["mode"] == "paced"}
    targets = {}
    if "redis" in flood and "raw-redis" in flood:
        ratio = flood["redis"]["msgs_per_s"] / flood["raw-redis"]["msgs_per_s"]
        targets["redis_flood_ratio"] = {
            "value": ratio,
            "target": TARGET_FLOOD_RATIO,
            "met": ratio >= TARGET_FLOOD_RATIO,
        }
    if "redis" in paced:
        p99 = paced["redis"]["p99_ms"]
        targets["redis_paced_p99_ms"] = {
            "value": p99,
            "target": TARGET_PACED_P99_MS,
            "met": p99 is not None and p99 <= TARGET_PACED_P99_MS,
        }
    print()
    for key, target in targets.items():
        verdict = "met" if target["met"] else "NOT met"
        print(f"target {key}: {target['value']:.2f} (target {target['target']}) -> {verdict}")
    print(f"\ntotal {time.monotonic() - began:.0f} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "pubsub",
                "count": args.count,
                "paced_count": args.paced_count,
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                },
                "rows": rows,
                "targets": targets,
            },
            indent=2,
        )
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
