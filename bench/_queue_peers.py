"""The systems bench/event_queue.py measures: accord's adapters and the peers, each behind one small class."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REDIS_URL = os.environ.get("ACCORD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "ACCORD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
AMQP_URL = os.environ.get("ACCORD_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
SYSTEMS = [
    "accord-redis",
    "saq-redis",
    "arq-redis",
    "dramatiq-redis",
    "accord-postgres",
    "accord-rabbitmq",
    "dramatiq-rabbitmq",
]
CHANNEL = "bench"
Stop = Callable[[], Awaitable[None]]


class System:
    """One queue system: the producer side (`connect`, `enqueue`) and the worker side (`serve`)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.url: str = config["url"]
        self.name = f"bench{config['run']}"

    async def connect(self) -> None: ...

    async def enqueue(self, payload: dict[str, Any]) -> None: ...

    async def enqueue_many(self, count: int, producers: int) -> None:
        async def producer(share: int) -> None:
            for _ in range(share):
                await self.enqueue({})

        shares = [
            count // producers + (1 if k < count % producers else 0) for k in range(producers)
        ]
        await asyncio.gather(*(producer(share) for share in shares))

    async def close(self) -> None: ...

    async def serve(self, recorder: Any, concurrency: int) -> Stop:
        raise NotImplementedError

    async def settled(self, count: int) -> float | None:
        """When the last job was acknowledged, if the system can tell; None otherwise."""
        return None

    async def drop(self) -> None:
        """Delete what the run left on the server."""


class Accord(System):
    def settings(self) -> Any:
        from accord import Settings

        return Settings(
            app_name=self.name,
            storage=str(Path(self.config["folder"]) / f"accord-{os.getpid()}"),
            queue_url=self.url,
            pubsub_url="memory://",
            lock_url="local",
        )

    async def connect(self) -> None:
        from accord import Application

        self.app = Application(settings=self.settings())
        await self.app.start()

    async def enqueue(self, payload: dict[str, Any]) -> None:
        await self.app.event_queue.publish(CHANNEL, payload)

    async def close(self) -> None:
        await self.app.stop()

    async def serve(self, recorder: Any, concurrency: int) -> Stop:
        from accord import Application

        async def process(payload: Any, ctx: Any) -> None:
            recorder.start(payload.get("t"))
            recorder.end()

        self.app = Application(settings=self.settings())
        self.app.event_queue.subscribe(CHANNEL, process=process, concurrency=concurrency)
        await self.app.start()
        return self.app.stop

    async def settled(self, count: int) -> float | None:
        deadline = time.monotonic() + 30
        while self.app.event_queue.counters.get("completed", 0) < count:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.001)
        return time.monotonic()

    async def drop(self) -> None:
        if self.url.startswith("redis"):
            from accord._keys import glob_escape
            from accord.adapters.redis.queue import PREFIX

            await delete_keys(self.url, glob_escape(PREFIX + self.name) + "*")


class Saq(System):
    async def connect(self) -> None:
        from saq import Queue

        self.queue = Queue.from_url(self.url, name=self.name)
        await self.queue.connect()

    async def enqueue(self, payload: dict[str, Any]) -> None:
        await self.queue.enqueue("noop", t=payload.get("t"))

    async def close(self) -> None:
        await self.queue.disconnect()

    async def serve(self, recorder: Any, concurrency: int) -> Stop:
        from saq import Queue, Worker

        async def noop(ctx: Any, *, t: float | None = None) -> None:
            recorder.start(t)
            recorder.end()

        queue = Queue.from_url(self.url, name=self.name)
        worker = Worker(queue, functions=[("noop", noop)], concurrency=concurrency)
        task = asyncio.create_task(worker.start())

        async def stop() -> None:
            await worker.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await queue.disconnect()

        return stop

    async def drop(self) -> None:
        await delete_keys(self.url, f"saq:*{self.name}*")


class Arq(System):
    def settings(self) -> Any:
        from arq.connections import RedisSettings

        return RedisSettings.from_dsn(self.url)

    async def connect(self) -> None:
        from arq import create_pool

        self.ids: list[str] = []
        self.pool = await create_pool(self.settings(), default_queue_name=f"arq:{self.name}")

    async def enqueue(self, payload: dict[str, Any]) -> None:
        job = await self.pool.enqueue_job("noop", payload.get("t"))
        if job is not None:
            self.ids.append(job.job_id)

    async def close(self) -> None:
        await self.pool.aclose()

    async def serve(self, recorder: Any, concurrency: int) -> Stop:
        from arq.worker import Worker, func

        async def noop(ctx: Any, t: float | None = None) -> None:
            recorder.start(t)
            recorder.end()

        worker = Worker(
            functions=[func(noop, name="noop")],
            redis_settings=self.settings(),
            queue_name=f"arq:{self.name}",
            handle_signals=False,
            max_jobs=concurrency,
        )
        task = asyncio.create_task(worker.main())

        async def stop() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await worker.close()

        return stop

    async def drop(self) -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.url)
        try:
            for start in range(0, len(self.ids), 1000):
                chunk = self.ids[start : start + 1000]
                keys = [f"arq:{kind}:{job}" for job in chunk for kind in ("job", "result", "retry")]
                await client.unlink(*keys)
        finally:
            await client.aclose()
        await delete_keys(self.url, f"arq:{self.name}*")


class Dramatiq(System):
    def broker(self) -> Any:
        if self.url.startswith("redis"):
            from dramatiq.brokers.redis import RedisBroker

            return RedisBroker(url=self.url, namespace=f"dramatiq-{self.name}")
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        return RabbitmqBroker(url=self.url)

    def declare(self, broker: Any, fn: Callable[..., None]) -> Any:
        import dramatiq

        return dramatiq.actor(fn, actor_name="noop", queue_name=self.name, broker=broker)

    async def connect(self) -> None:
        self.producer = self.broker()
        self.actor = self.declare(self.producer, lambda t=None: None)

    async def enqueue(self, payload: dict[str, Any]) -> None:
        # dramatiq's client is synchronous; the paced loop calls it in place.
        self.actor.send(payload.get("t"))

    async def enqueue_many(self, count: int, producers: int) -> None:
        # Real threads, as dramatiq producers run; pika channels are per thread.
        def produce(share: int) -> None:
            for _ in range(share):
                self.actor.send(None)

        shares = [
            count // producers + (1 if k < count % producers else 0) for k in range(producers)
        ]
        threads = [threading.Thread(target=produce, args=(share,)) for share in shares]
        for thread in threads:
            thread.start()
        await asyncio.to_thread(lambda: [thread.join() for thread in threads])

    async def close(self) -> None:
        self.producer.close()

    async def serve(self, recorder: Any, concurrency: int) -> Stop:
        import dramatiq

        def noop(t: float | None = None) -> None:
            recorder.start(t)
            recorder.end()

        broker = self.broker()
        self.declare(broker, noop)
        worker = dramatiq.Worker(broker, worker_threads=concurrency)
        worker.start()

        async def stop() -> None:
            await asyncio.to_thread(worker.stop)
            broker.close()

        return stop

    async def drop(self) -> None:
        if self.url.startswith("redis"):
            await delete_keys(self.url, f"dramatiq-{self.name}*")


def make_system(name: str, config: dict[str, Any]) -> System:
    kind = name.partition("-")[0]
    return {"accord": Accord, "saq": Saq, "arq": Arq, "dramatiq": Dramatiq}[kind](config)


async def delete_keys(url: str, pattern: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        batch = []
        async for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await client.unlink(*batch)
                batch = []
        if batch:
            await client.unlink(*batch)
    finally:
        await client.aclose()


class _Cleanup:
    """Gives each system a fresh place on its server, and removes it afterwards."""

    async def prepare(self, name: str, folder: Path) -> dict[str, Any]:
        engine = name.partition("-")[2]
        config: dict[str, Any] = {"run": uuid.uuid4().hex[:8], "folder": str(folder)}
        if name.startswith("accord-") and engine != "redis":
            import importlib

            importlib.import_module(f"accord.adapters.{engine}.queue")
        if engine == "redis":
            config["url"] = REDIS_URL
        elif engine == "postgres":
            import asyncpg

            schema = f"bench_{config['run']}"
            connection = await asyncpg.connect(POSTGRES_URL)
            try:
                await connection.execute(f'CREATE SCHEMA "{schema}"')
            finally:
                await connection.close()
            config["schema"] = schema
            config["url"] = f"{POSTGRES_URL}?search_path={schema}"
        elif engine == "rabbitmq":
            vhost = f"bench_{config['run']}"
            ctl = shutil.which("rabbitmqctl") or "rabbitmqctl"
            subprocess.run([ctl, "add_vhost", vhost], check=True, capture_output=True)
            user = "guest"
            subprocess.run(
                [ctl, "set_permissions", "-p", vhost, user, ".*", ".*", ".*"],
                check=True,
                capture_output=True,
            )
            config["vhost"] = vhost
            config["url"] = AMQP_URL.rstrip("/") + "/" + vhost
        return config

    async def finish(self, name: str, config: dict[str, Any], system: System | None) -> None:
        if system is not None:
            await system.drop()
        if "schema" in config:
            import asyncpg

            connection = await asyncpg.connect(POSTGRES_URL)
            try:
                await connection.execute(f'DROP SCHEMA "{config["schema"]}" CASCADE')
            finally:
                await connection.close()
        if "vhost" in config:
            ctl = shutil.which("rabbitmqctl") or "rabbitmqctl"
            subprocess.run([ctl, "delete_vhost", config["vhost"]], check=False, capture_output=True)


cleanup = _Cleanup()
