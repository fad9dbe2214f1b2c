"""Application: holds the plugins and the five managers, and runs their lifecycle."""

from __future__ import annotations

import enum
import inspect
import logging
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType, TracebackType
from typing import Any

from sqlalchemy import Column, DateTime, MetaData, String, Table, select

from .cache import Cache, CacheManager
from .cluster import Cluster, new_instance_id
from .config import Settings
from .db import Database
from .event_queue import EventQueue
from .exceptions import AccordError, PluginError, StateError
from .locks import LockManager
from .plugin import Plugin
from .pubsub import PubSubManager
from .sync_messages import SyncMessageManager
from .types import EventHandler

logger = logging.getLogger("accord.app")

INSTALL_LOCK = "accord:install"

_metadata = MetaData()
installed_plugins = Table(
    "accord_plugins",
    _metadata,
    Column("app", String(200), primary_key=True),
    Column("name", String(200), primary_key=True),
    Column("installed_at", DateTime(timezone=True), nullable=False),
)


class AppState(enum.Enum):
    """Where an application is in its lifecycle; a stopped application does not start again."""

    NEW = "new"
    STARTING = "starting"
    STARTED = "started"
    STOPPING = "stopping"
    STOPPED = "stopped"


class AppLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the app name and the instance id."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = self.extra or {}
        return f"[{extra.get('app')}@{extra.get('instance_id')}] {msg}", kwargs


class Application:
    """One instance of a plugin-based application.

    Args:
        name: the application name; wins over `settings.app_name`. Default: the settings' name.
        plugins: plugin classes or instances, in the order their hooks run.
        settings: where state lives. Default: `Settings.from_env()`.

    Example:
        app = Application(name="main", plugins=[Greeter], settings=Settings.from_env())
        async with app:
            await app.pub_sub_manager.publish("hello", {"from": app.instance_id})
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        plugins: Iterable[type[Plugin] | Plugin] = (),
        settings: Settings | None = None,
    ) -> None:
        settings = settings if settings is not None else Settings.from_env()
        if name is not None and name != settings.app_name:
            settings = settings.replace(app_name=name)
        self.settings = settings
        self.name = settings.app_name
        self.instance_id = new_instance_id()
        self.log = AppLogger(logger, {"app": self.name, "instance_id": self.instance_id})
        self.state = AppState.NEW
        self._handlers: dict[str, list[EventHandler]] = {}
        self._plugins: dict[str, Plugin] = {}
        for entry in plugins:
            self._add_plugin(entry)
        self.db = Database(settings.resolved_db_url)
        self.lock_manager = LockManager(self)
        self.pub_sub_manager = PubSubManager(self)
        self.sync_message_manager = SyncMessageManager(self)
        self.event_queue = EventQueue(self)
        self.cache_manager = CacheManager(self)
        self.cluster = Cluster(self)
        self._loaded: list[Plugin] = []
        self._started: set[str] = set()

    def __repr__(self) -> str:
        return f"<Application {self.name!r} {self.instance_id} {self.state.value}>"

    def rename(self, instance_id: str) -> None:
        """Take another instance id (the backend found this one held by a live instance)."""
        self.instance_id = instance_id
        self.log = AppLogger(logger, {"app": self.name, "instance_id": instance_id})
        for plugin in self._plugins.values():
            plugin._attach(self)

    @property
    def plugins(self) -> Mapping[str, Plugin]:
        """Plugin name -> plugin instance, in registration order (read-only)."""
        return MappingProxyType(self._plugins)

    @property
    def cache(self) -> Cache:
        """The default cache, named after the application."""
        return self.cache_manager.default

    def _add_plugin(self, entry: type[Plugin] | Plugin) -> None:
        plugin = entry() if isinstance(entry, type) else entry
        if not isinstance(plugin, Plugin):
            raise PluginError(f"{entry!r} is not a Plugin class or instance")
        if not plugin.name:
            raise PluginError(
                f"{type(plugin).__name__} has no name; set `name = '...'` on the class"
            )
        if plugin.name in self._plugins:
            raise PluginError(
                f"two plugins are named {plugin.name!r} "
                f"({type(self._plugins[plugin.name]).__name__} and {type(plugin).__name__}); "
                "plugin names must be unique",
                plugin=plugin.name,
            )
        plugin._attach(self)
        self._plugins[plugin.name] = plugin

    # App events.

    def on(self, event: str, handler: EventHandler) -> None:
        """Call `handler` (plain or async) each time `event` is emitted."""
        self._handlers.setdefault(event, []).append(handler)

    def off(self, event: str, handler: EventHandler) -> None:
        """Stop calling `handler` for `event`; unknown handlers are ignored."""
        handlers = self._handlers.get(event, [])
        if handler in handlers:
            handlers.remove(handler)

    async def emit(self, event: str, *args: Any, **kwargs: Any) -> None:
        """Call every handler of `event` in order; a handler's error propagates."""
        for handler in list(self._handlers.get(event, ())):
            result = handler(*args, **kwargs)
            if inspect.isawaitable(result):
                await result

    # Lifecycle.

    async def __aenter__(self) -> Application:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Load every plugin, connect every adapter and start consumers (DESIGN.md section 2).

        If anything fails, whatever already started is stopped again and the
        error propagates; a plugin's failure is a `PluginError` naming it.
        """
        if self.state in (AppState.STARTING, AppState.STARTED):
            self.log.warning(
                "start() called on an application that is already %s", self.state.value
            )
            return
        if self.state is not AppState.NEW:
            raise StateError(
                f"application {self.name!r} is {self.state.value}; create a new Application to start again"
            )
        self.settings.check_dependencies()
        self.state = AppState.STARTING
        self.log.info(
            "starting with %d plugin(s): %s", len(self._plugins), ", ".join(self._plugins)
        )
        try:
            await self._start()
        except BaseException as exc:
            self.log.error("start failed: %s; stopping what had started", exc)
            await self._shutdown()
            raise
        self.state = AppState.STARTED
        self.log.info("started")

    async def _start(self) -> None:
        await self.db.connect()
        self._started.add("db")
        self._started.add("caches")
        for plugin in self._plugins.values():
            await self._hook(plugin, "after_add")
        for plugin in self._plugins.values():
            await self._hook(plugin, "before_load")
        await self.emit("before_load")
        for plugin in self._plugins.values():
            if type(plugin).overrides("handle_sync_message"):
                await self.sync_message_manager.subscribe(plugin.name, plugin.handle_sync_message)
            self._loaded.append(plugin)
            await self._hook(plugin, "load")
        await self.emit("after_load")
        self._started.add("cluster")
        await self.cluster.join()
        self._started.add("locks")
        await self.lock_manager.connect()
        self._started.add("pubsub")
        await self.pub_sub_manager.connect()
        await self.sync_message_manager.connect()
        self._started.add("queue")
        await self.event_queue.connect()
        await self.cache_manager.connect()
        await self._install()
        await self.emit("before_start")
        for plugin in self._plugins.values():
            await self._hook(plugin, "after_start")
        await self.event_queue.start_consumers()
        await self.emit("after_start")

    async def _install(self) -> None:
        pending = [p for p in self._plugins.values() if type(p).overrides("install")]
        if not pending:
            return
        await self.db.create_tables(_metadata)
        # Two instances starting together must not both install a plugin.
        async with (
            self.lock_manager.lock(INSTALL_LOCK, ttl=30),
            self.db.transaction() as tx,
        ):
            rows = await tx.connection.execute(
                select(installed_plugins.c.name).where(installed_plugins.c.app == self.name)
            )
            done = {row[0] for row in rows}
            for plugin in pending:
                if plugin.name in done:
                    continue
                await self._hook(plugin, "install")
                await tx.connection.execute(
                    installed_plugins.insert().values(
                        app=self.name, name=plugin.name, installed_at=datetime.now(UTC)
                    )
                )
                self.log.info("installed plugin %s", plugin.name)

    async def _hook(self, plugin: Plugin, hook: str) -> None:
        try:
            await getattr(plugin, hook)()
        except Exception as exc:
            if isinstance(exc, PluginError) and exc.plugin is not None:
                raise
            # accord's own errors read as sentences; anything else is named by its type.
            detail = str(exc) if isinstance(exc, AccordError) else f"{type(exc).__name__}: {exc}"
            raise PluginError(
                f"plugin {plugin.name!r} failed in {hook}: {detail}", plugin=plugin.name, hook=hook
            ) from exc

    async def stop(self) -> None:
        """Stop gracefully: drain the queue, close pub/sub, release locks, close the database.

        Stopping an application that is not started is a no-op.
        """
        if self.state is not AppState.STARTED:
            if self.state is AppState.NEW:
                self.log.debug("stop() on an application that never started")
            return
        self.log.info("stopping")
        await self._shutdown()
        self.log.info("stopped")

    async def _shutdown(self) -> None:
        self.state = AppState.STOPPING
        started = self._started
        await self._quietly("before_stop event", self.emit("before_stop"))
        for plugin in self._loaded:
            await self._quietly(f"plugin {plugin.name!r} before_stop", plugin.before_stop())
        if "queue" in started:
            await self._quietly("event queue close", self.event_queue.close())
        if "pubsub" in started:
            await self._quietly("sync message close", self.sync_message_manager.close())
            await self._quietly("pub/sub close", self.pub_sub_manager.close())
        for plugin in self._loaded:
            await self._quietly(f"plugin {plugin.name!r} after_stop", plugin.after_stop())
        await self._quietly("after_stop event", self.emit("after_stop"))
        if "locks" in started:
            await self._quietly("lock manager close", self.lock_manager.close())
        if "cluster" in started:
            await self._quietly("cluster leave", self.cluster.close())
        if "db" in started:
            await self._quietly("database close", self.db.close())
        if "caches" in started:
            await self._quietly("cache manager close", self.cache_manager.close())
        self._started = set()
        self.state = AppState.STOPPED

    async def abort(self) -> None:
        """Stop without any graceful step, as a crash would: no hooks, no drain, no release.

        Leases and locks this instance held stay in the shared backends until
        they expire. Meant for tests of failure handling (`accord.testing.stop_abruptly`).
        """
        if self.state is AppState.STOPPED:
            return
        self.state = AppState.STOPPING
        for name, manager in (
            ("event queue", self.event_queue),
            ("sync messages", self.sync_message_manager),
            ("pub/sub", self.pub_sub_manager),
            ("locks", self.lock_manager),
            ("caches", self.cache_manager),
            ("cluster", self.cluster),
        ):
            await self._quietly(f"{name} abort", manager.abort())
        await self._quietly("database close", self.db.close())
        self.state = AppState.STOPPED
        self.log.warning("aborted")

    async def _quietly(self, what: str, awaitable: Any) -> None:
        try:
            await awaitable
        except Exception:
            self.log.exception("%s failed; stopping continues", what)
