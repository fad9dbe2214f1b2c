"""Running one application until SIGINT or SIGTERM: the loop behind `accord worker` and `serve`."""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from .exceptions import AccordError
from .plugin import Plugin

if TYPE_CHECKING:
    from .app import Application

logger = logging.getLogger("accord.worker")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class PluginSpecError(Exception):
    """A `--plugin module:Class` spec that does not name a Plugin class; the message says why."""


class HttpServer(Protocol):
    """What `run` needs of an HTTP server (a `uvicorn.Server` fits).

    `serve()` runs until `should_exit` is set, then stops accepting connections
    and lets open requests finish; `force_exit` stops waiting for them.
    """

    should_exit: bool
    force_exit: bool

    async def serve(self) -> None: ...


def load_plugin(spec: str) -> type[Plugin]:
    """Import the Plugin class that `spec` ("package.module:Class") names.

    Args:
        spec: a module path, a colon, and the class (dotted for a nested class).

    Raises:
        PluginSpecError: the spec is malformed, the module does not import, the
            attribute is missing or it is not a Plugin subclass.
    """
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise PluginSpecError(
            f"--plugin {spec!r} is not module:Class; write it as e.g. myapp.plugins:Greeter"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise PluginSpecError(
            f"--plugin {spec!r}: cannot import module {module_name!r} "
            f"({type(exc).__name__}: {exc}); check the name and that its folder is on "
            "PYTHONPATH (or the package is installed)"
        ) from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise PluginSpecError(
                f"--plugin {spec!r}: {getattr(target, '__name__', module_name)!r} has no "
                f"attribute {part!r}; check the class name"
            )
        target = getattr(target, part)
    if not (isinstance(target, type) and issubclass(target, Plugin)):
        kind = "a class" if isinstance(target, type) else f"a {type(target).__name__}"
        raise PluginSpecError(
            f"--plugin {spec!r} names {kind} that is not a subclass of accord.Plugin; "
            "name the plugin class"
        )
    return target


def load_plugins(specs: Iterable[str]) -> list[type[Plugin]]:
    """`load_plugin` for each spec, in order."""
    return [load_plugin(spec) for spec in specs]


def configure_logging(level: str) -> None:
    """Log lines to stderr at `level` ("DEBUG", "INFO", ...) with the standard `logging`."""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


async def run(app: Application, *, http: HttpServer | None = None, command: str = "worker") -> int:
    """Start `app` (and `http` after it), run until SIGINT or SIGTERM, then stop.

    The first signal stops the HTTP server (no new connections, open requests
    finish), then the application gracefully (`app.stop()`: in-flight jobs get
    `stop_grace`). A second signal while stopping aborts (`app.abort()`); a
    third one gets the default handling.

    Args:
        app: a new application.
        http: an HTTP server to run next to it. Default none (a worker).
        command: the command name printed before an error line.

    Returns:
        the exit status: 0 after a graceful stop, 1 when the start failed, the
        HTTP server failed or the stop was aborted.
    """
    loop = asyncio.get_running_loop()
    signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
    for sig in SIGNALS:
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    try:
        return await _Run(app, http, signals, command).main()
    finally:
        _restore_signals(loop)


def _restore_signals(loop: asyncio.AbstractEventLoop) -> None:
    for sig in SIGNALS:
        loop.remove_signal_handler(sig)


class _Run:
    def __init__(
        self,
        app: Application,
        http: HttpServer | None,
        signals: asyncio.Queue[signal.Signals],
        command: str,
    ) -> None:
        self.app = app
        self.http = http
        self.signals = signals
        self.command = command

    async def main(self) -> int:
        starting = asyncio.create_task(self.app.start())
        received = await self._wait(starting)
        if received is not None:
            logger.info("%s received while starting; stopping", received.name)
            # A cancelled start stops what had already started before it re-raises.
            starting.cancel()
            return await self._finish(starting, "start", EXIT_OK)
        try:
            starting.result()
        except AccordError as exc:
            self._error(f"start failed: {exc}")
            return EXIT_FAILED

        code = EXIT_OK
        serving = asyncio.create_task(self._serve_http()) if self.http is not None else None
        logger.info(
            "%s running as instance %s; SIGINT or SIGTERM stops it",
            self.app.name,
            self.app.instance_id,
        )
        if serving is None:
            received = await self.signals.get()
        else:
            received = await self._wait(serving)
            if received is None:
                code = EXIT_FAILED
                self._error(self._http_failure(serving))
        if received is not None:
            logger.info("%s received; stopping (send it again to abort)", received.name)

        if serving is not None and self.http is not None and not serving.done():
            self.http.should_exit = True
            if await self._wait(serving) is not None:
                self.http.force_exit = True
                return await self._abort(serving)
            if serving.exception() is not None:
                logger.error("the HTTP server failed while closing: %s", serving.exception())
        stopping = asyncio.create_task(self.app.stop())
        return await self._finish(stopping, "stop", code)

    async def _serve_http(self) -> None:
        if self.http is None:  # pragma: no cover - only created with a server
            return
        try:
            await self.http.serve()
        except SystemExit as exc:
            # Uvicorn exits the process when it cannot bind; here the application must stop first.
            raise OSError(f"the HTTP server could not start (exit status {exc.code})") from None

    def _http_failure(self, serving: asyncio.Task[None]) -> str:
        exc = serving.exception()
        if exc is None:
            return "the HTTP server stopped on its own; stopping the application"
        return f"{exc}; stopping the application"

    async def _finish(self, task: asyncio.Task[None], step: str, code: int) -> int:
        """Wait for `task` (a cancelled start, or a stop), then return `code`; a signal aborts."""
        if await self._wait(task) is not None:
            return await self._abort(task)
        try:
            task.result()
        except asyncio.CancelledError:
            pass
        except AccordError as exc:
            self._error(f"{step} failed: {exc}")
            return EXIT_FAILED
        return code

    async def _abort(self, task: asyncio.Task[None]) -> int:
        logger.warning("second signal: aborting without draining or releasing")
        _restore_signals(asyncio.get_running_loop())
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            # Whatever the interrupted step raised, abort() below is what ends the instance.
            pass
        await self.app.abort()
        return EXIT_FAILED

    async def _wait(self, task: asyncio.Future[Any]) -> signal.Signals | None:
        """Wait until `task` is done (None) or a signal arrives (the signal)."""
        getting = asyncio.ensure_future(self.signals.get())
        try:
            await asyncio.wait({task, getting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getting.done():
                getting.cancel()
        if task.done():
            if getting.done() and not getting.cancelled():
                self.signals.put_nowait(getting.result())
            return None
        return getting.result()

    def _error(self, message: str) -> None:
        print(f"accord {self.command}: {message}", file=sys.stderr, flush=True)
