"""Forks N short-lived instances; each commits a sync message and dies (os._exit) before the relay runs.

Usage: python sync_crash_worker.py COUNT CONCURRENCY (settings from ACCORD_* variables).
Exits 0 when every child died inside its after-commit callback, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

from sqlalchemy import text

from accord import Application, Plugin, Settings

#: Exit code of a child that died where it should: after commit, before the relay.
CRASHED = 17
#: Seconds the dying instance's claim on its row lasts; a survivor sends the row after it.
CLAIM_LEASE = 1.0


class Crashing(Plugin):
    name = "crashing"

    async def handle_sync_message(self, message: Any) -> None:
        pass


async def crash_once(number: int) -> None:
    app = Application(plugins=[Crashing], settings=Settings.from_env())
    app.sync_message_manager.outbox.claim_lease = CLAIM_LEASE
    await app.start()
    async with app.db.transaction() as tx:
        await tx.connection.execute(text("INSERT INTO crash_items VALUES (:n)"), {"n": number})
        # Registered before the message, so it runs before the relay's callback.
        tx.after_commit(lambda: os._exit(CRASHED))
        message = {"n": number, "t": time.time()}
        await app.plugins["crashing"].send_sync_message(message, transaction=tx)


def child(number: int) -> None:
    try:
        asyncio.run(crash_once(number))
    except BaseException as exc:
        print(f"child {number} failed before crashing: {exc!r}", file=sys.stderr, flush=True)
    os._exit(1)


def main() -> int:
    count, concurrency = int(sys.argv[1]), int(sys.argv[2])
    running: set[int] = set()
    failures = 0

    def reap() -> None:
        nonlocal failures
        pid, status = os.wait()
        running.discard(pid)
        if os.waitstatus_to_exitcode(status) != CRASHED:
            failures += 1

    for number in range(count):
        while len(running) >= concurrency:
            reap()
        pid = os.fork()
        if pid == 0:
            child(number)
        running.add(pid)
    while running:
        reap()
    print(f"{count} children, {failures} did not crash as planned", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
