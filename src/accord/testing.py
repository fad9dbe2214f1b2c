"""Test helpers for users' own suites: an in-process cluster and fault injection."""

from __future__ import annotations

import asyncio
import inspect
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager

from .app import Application, AppState
from .config import Settings
from .exceptions import PluginError, StateError
from .plugin import Plugin

__all__ = ["cluster", "cut_off", "reconnect", "stop_abruptly", "wait_until"]


@asynccontextmanager
async def cluster(
    n: int,
    *,
    plugins: Iterable[type[Plugin]] = (),
    settings: Settings | None = None,
    url: str | None = None,
    name: str | None = None,
) -> AsyncIterator[list[Application]]:
    """Start `n` instances of one application in this process; stop them all on exit.

    By default they share a private memory bus, memory queue and lock table
    (named after a random cluster id, so two clusters in one process never
    meet) and one SQLite database in a temporary folder.

    Args:
        n: how many instances.
        plugins: plugin classes; each instance gets its own instances of them.
        settings: base settings for every instance. Default: embedded defaults, isolated.
        url: a `cluster_url` (Redis or PostgreSQL) to run on real engines instead.
        name: the application name. Default: the settings' name.

    Example:
        async with cluster(3, plugins=[Greeter]) as apps:
            await apps[0].pub_sub_manager.publish("hello", {})
            await wait_until(lambda: all(app.plugins["greeter"].seen for app in apps[1:]))
    """
    if n < 1:
        raise ValueError(f"cluster needs at least one instance, got n={n}")
    plugin_classes = list(plugins)
    for entry in plugin_classes:
        if not isinstance(entry, type):
            raise PluginError(
                f"cluster() needs plugin classes, not instances ({entry!r}): "
                "each instance gets its own plugin objects"
            )
    async with AsyncExitStack() as stack:
        if settings is None:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="accord-cluster-"))
            bus = f"memory://cluster-{uuid.uuid4().hex[:8]}"
            settings = Settings(
                app_name=name or "main",
                storage=folder,
                pubsub_url=bus,
                queue_url=bus,
                lock_url=bus,
            )
        if url is not None:
            settings = settings.replace(
                cluster_url=url, pubsub_url=None, queue_url=None, lock_url=None
            )
        if name is not None:
            settings = settings.replace(app_name=name)
        apps = [Application(plugins=plugin_classes, settings=settings) for _ in range(n)]
        stack.push_async_callback(_stop_all, apps)
        for app in apps:
            await app.start()
        yield apps


async def _stop_all(apps: list[Application]) -> None:
    for app in apps:
        if app.state is AppState.STARTED:
            await app.stop()


async def stop_abruptly(app: Application) -> None:
    """Stop `app` as a crash would: no hooks, no drain, no lock release, no acknowledgement."""
    await app.abort()


async def cut_off(app: Application) -> None:
    """Sever `app`'s pub/sub receiving link as a network fault would; it stays down until `reconnect`.

    Returns once the loss is reported (`pubsub:lost` emitted). Messages
    published meanwhile are missed by `app`; its own publishes still go out.
    """
    adapter = app.pub_sub_manager.adapter
    if adapter is None:
        raise StateError("cut_off: the application's pub/sub is not connected")
    await adapter.sever()


async def reconnect(app: Application) -> None:
    """Let a link severed by `cut_off` reconnect; return once it is resubscribed (`pubsub:restored`)."""
    adapter = app.pub_sub_manager.adapter
    if adapter is None:
        raise StateError("reconnect: the application's pub/sub is not connected")
    await adapter.restore()


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 5.0,
    *,
    interval: float = 0.01,
    message: str | None = None,
) -> None:
    """Poll `predicate` (plain or async) until it is true; `TimeoutError` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(message or f"condition not met within {timeout} s: {predicate!r}")
        await asyncio.sleep(interval)
