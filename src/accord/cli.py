"""The `accord` command: `accord demo`, `accord doctor`, `accord status`, `accord --version`."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
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
    args = parser.parse_args(argv)
    if args.command == "demo":
        return asyncio.run(run_demo(verbose=args.verbose))
    if args.command == "doctor":
        return asyncio.run(run_doctor())
    if args.command == "status":
        return asyncio.run(run_status(as_json=args.json))
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


def _say(line: str) -> None:
    print(f"   {line}", flush=True)


def _load_step(target: str) -> Callable[[Callable[[str], None]], Awaitable[None]]:
    module_name, _, function = target.partition(":")
    module = importlib.import_module(f"accord._demo.{module_name}")
    step: Callable[[Callable[[str], None]], Awaitable[None]] = getattr(module, function)
    return step


if __name__ == "__main__":  # pragma: no cover - `python -m accord.cli`
    sys.exit(main())
