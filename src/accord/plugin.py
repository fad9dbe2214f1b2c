"""Plugin: the base class of everything that runs inside an Application."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

from .exceptions import StateError

if TYPE_CHECKING:
    from .app import Application
    from .db import Database, Transaction

HOOKS = ("after_add", "before_load", "load", "install", "after_start", "before_stop", "after_stop")


class PluginLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the plugin name and the instance id."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = self.extra or {}
        return f"[{extra.get('plugin')}@{extra.get('instance_id')}] {msg}", kwargs


class Plugin:
    """A unit of application behaviour with lifecycle hooks.

    Subclass it, give it a `name`, and override the hooks you need. Plugins
    are passed to `Application(plugins=[...])` as classes or as instances.

    Args:
        **options: kept as `self.options` for the plugin's own use.

    Example:
        class Greeter(Plugin):
            name = "greeter"

            async def load(self) -> None:
                self.cache = await self.app.cache_manager.create_cache(name="greeter")

            async def handle_sync_message(self, message: dict) -> None:
                await self.reload()
    """

    name: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self._app: Application | None = None
        self._log: PluginLogger | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    @property
    def app(self) -> Application:
        if self._app is None:
            raise StateError(f"plugin {self.name!r} is not added to an application yet")
        return self._app

    @property
    def db(self) -> Database:
        return self.app.db

    @property
    def log(self) -> PluginLogger:
        if self._log is None:
            instance_id = self._app.instance_id if self._app is not None else "-"
            self._log = PluginLogger(
                logging.getLogger(f"accord.plugin.{self.name}"),
                {"plugin": self.name, "instance_id": instance_id},
            )
        return self._log

    def _attach(self, app: Application) -> None:
        self._app = app
        self._log = None

    # Lifecycle hooks, awaited in registration order (see DESIGN.md section 2).

    async def after_add(self) -> None:
        """The plugin was added to the application, before anything loads."""

    async def before_load(self) -> None:
        """Every plugin's `before_load` runs before any plugin's `load`."""

    async def load(self) -> None:
        """Create caches, subscriptions and queue consumers here."""

    async def install(self) -> None:
        """Runs once per database, the first time the plugin starts against it."""

    async def after_start(self) -> None:
        """Every adapter is connected; queue consumers begin right after this."""

    async def before_stop(self) -> None:
        """The application is stopping; queue consumers stop taking work after this."""

    async def after_stop(self) -> None:
        """Pub/sub is closed; locks, the database and caches close after this."""

    async def handle_sync_message(self, message: Any) -> None:
        """Another instance sent this plugin a sync message; reload local state.

        Only plugins that override this method are subscribed to their sync channel.
        """

    async def on_resync(self) -> None:
        """Sync messages may have been missed and cannot be replayed; reload from the database."""

    async def send_sync_message(
        self, message: Any, *, transaction: Transaction | None = None
    ) -> None:
        """Tell this plugin on the other instances that state changed.

        Args:
            message: JSON-compatible data.
            transaction: publish only after it commits; drop it on rollback. Default: now.
        """
        await self.app.sync_message_manager.publish(self.name, message, transaction=transaction)

    @classmethod
    def overrides(cls, hook: str) -> bool:
        """Whether this plugin class overrides `hook` of `Plugin`."""
        return getattr(cls, hook) is not getattr(Plugin, hook)
