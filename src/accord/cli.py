"""The `accord` command: `demo`, `serve`, `worker`, `status`, `doctor`, `--version`."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

from . import __version__

# (title, "module:function") in the order the demo narrates them.
DEMO_STEPS = [
    ("Lifecycle: three instances of one application", "foundation:lifecycle"),
    ("Database: transactions and after-commit hooks", "foundation:database"),
    ("Cache", "cache:run"),
    ("Pub/sub", "pubsub:run"),
    ("Sync messages", "sync_messages:run"),
    ("Event queue", "event_queue:run"),
    ("Locks", "locks:run"),
]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `accord` command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="accord", description=__doc__)
    parser.add_argument("--version", action="version", version=f"accord {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="a narrated 3-instance cluster in one process, on the embedded defaults"
    )
    demo.add_argument("--verbose", action="store_true", help="show accord's own log lines too")
    commands.add_parser(
        "doctor", help="reach every backend the ACCORD_* settings name and report what answered"
    )
    status = commands.add_parser(
        "status",
        help="the live instances, queues and held locks of the application the ACCORD_* settings name",
    )
    status.add_argument("--json", action="store_true", help="print one JSON document instead")
    worker = commands.add_parser(
        "worker",
        help="run an instance with the given plugins (queue consumers included), no HTTP listener",
    )
    _instance_options(worker, plugins_required=True)
    serve = commands.add_parser(
        "serve",
        help="run an instance with the given plugins and an HTTP API and status page",
    )
    _instance_options(serve, plugins_required=False)
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default %(default)s)"
    )
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return asyncio.run(run_demo(verbose=args.verbose))
    if args.command == "doctor":
        return asyncio.run(run_doctor())
    if args.command == "status":
        return asyncio.run(run_status(as_json=args.json))
    if args.command == "worker":
        return asyncio.run(
            run_instance("worker", args.plugin, app_name=args.app, log_level=args.log_level)
        )
    if args.command == "serve":
        return asyncio.run(
            run_instance(
                "serve",
                args.plugin,
                app_name=args.app,
                log_level=args.log_level,
                http=(args.host, args.port),
            )
        )
    parser.print_help()
    return 2


async def run_demo(*, verbose: bool = False) -> int:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.ERROR,
        format="    %(levelname)s %(name)s: %(message)s",
    )
    print(f"accord {__version__} demo: 3 instances in one process, embedded defaults (no servers)")
    started = time.monotonic()
    for number, (title, target) in enumerate(DEMO_STEPS, 1):
        print(f"\n{number}. {title}")
        step = _load_step(target)
        await step(_say)
    print(f"\ndemo finished in {time.monotonic() - started:.1f} s")
    return 0


async def run_doctor() -> int:
    from ._doctor import render, run_checks
    from .config import Settings
    from .exceptions import ConfigError

    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"FAIL settings: {exc}")
        return 1
    print(f"accord {__version__} doctor: {settings!r}")
    checks = await run_checks(settings)
    print(render(checks))
    return 0 if all(check.ok for check in checks) else 1


async def run_status(*, as_json: bool = False) -> int:
    from ._status import collect, embedded_settings, render
    from .config import Settings
    from .exceptions import AccordError

    try:
        settings = Settings.from_env()
    except AccordError as exc:
        print(f"accord status: {exc}", file=sys.stderr)
        return 1
    if len(embedded_settings(settings)) == 3:
        print(
            "accord status: membership, queue and locks all run in-process here, so another "
            "process has nothing to read; set ACCORD_CLUSTER_URL (or ACCORD_QUEUE_URL, "
            "ACCORD_LOCK_URL) to the Redis or PostgreSQL server the instances use",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        status = await collect(settings)
    except AccordError as exc:
        print(f"accord status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status.as_json(), indent=2) if as_json else render(status))
    return 0


async def run_instance(
    command: str,
    specs: Sequence[str],
    *,
    app_name: str | None = None,
    log_level: str = "INFO",
    http: tuple[str, int] | None = None,
) -> int:
    """`accord worker` (no `http`) and `accord serve` (`http` = host, port)."""
    from . import _worker
    from .app import Application
    from .config import Settings
    from .exceptions import AccordError

    # As `python -m` does, and uvicorn with its app dir: plugin modules import from here.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        plugins = _worker.load_plugins(specs)
    except _worker.PluginSpecError as exc:
        print(f"accord {command}: {exc}", file=sys.stderr)
        return _worker.EXIT_USAGE
    _worker.configure_logging(log_level)
    try:
        app = Application(app_name, plugins=plugins, settings=Settings.from_env())
        server = None
        if http is not None:
            from .server import _uvicorn_server

            host, port = http
            server = _uvicorn_server(app, host=host, port=port)
    except AccordError as exc:
        print(f"accord {command}: {exc}", file=sys.stderr)
        return _worker.EXIT_FAILED
    logging.getLogger("accord.worker").info("accord %s %s: %r", __version__, command, app.settings)
    return await _worker.run(app, http=server, command=command)


def _instance_options(parser: argparse.ArgumentParser, *, plugins_required: bool) -> None:
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        required=plugins_required,
        metavar="MODULE:CLASS",
        help="a Plugin class to load, e.g. myapp.plugins:Greeter (repeat for several, in order)",
    )
    parser.add_argument(
        "--app", metavar="NAME", help="the application name (wins over ACCORD_APP_NAME)"
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log lines on stderr from this level up (default %(default)s)",
    )


def _say(line: str) -> None:
    print(f"   {line}", flush=True)


def _load_step(target: str) -> Callable[[Callable[[str], None]], Awaitable[None]]:
    module_name, _, function = target.partition(":")
    module = importlib.import_module(f"accord._demo.{module_name}")
    step: Callable[[Callable[[str], None]], Awaitable[None]] = getattr(module, function)
    return step


if __name__ == "__main__":  # pragma: no cover - `python -m accord.cli`
    sys.exit(main())
