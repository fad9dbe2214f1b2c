"""Demo step: sync messages keep three instances' in-memory state in step with the database."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import text

from ..app import Application
from ..plugin import Plugin
from ..testing import cluster, stop_abruptly, wait_until

WAIT = 10.0


class Prices(Plugin):
    """Holds the price list in memory; reloads it when another instance says it changed."""

    name = "prices"

    async def load(self) -> None:
        self.prices: dict[str, float] = {}
        self.reloads = 0
        async with self.db.transaction() as tx:
            await tx.connection.execute(
                text(
                    "CREATE TABLE IF NOT EXISTS demo_prices (item VARCHAR(50) PRIMARY KEY, price REAL)"
                )
            )
        await self.reload()

    async def reload(self) -> None:
        async with self.db.transaction() as tx:
            rows = await tx.connection.execute(text("SELECT item, price FROM demo_prices"))
            self.prices = {item: price for item, price in rows}

    async def handle_sync_message(self, message: Any) -> None:
        await self.reload()
        self.reloads += 1

    async def set_price(self, item: str, price: float, *, commit: bool = True) -> None:
        class Cancelled(Exception):
            pass

        try:
            async with self.db.transaction() as tx:
                await tx.connection.execute(
                    text("DELETE FROM demo_prices WHERE item = :item"), {"item": item}
                )
                await tx.connection.execute(
                    text("INSERT INTO demo_prices VALUES (:item, :price)"),
                    {"item": item, "price": price},
                )
                await self.send_sync_message({"changed": item}, transaction=tx)
                if not commit:
                    raise Cancelled
        except Cancelled:
            return
        self.prices[item] = price


def prices(app: Application) -> Prices:
    plugin = app.plugins["prices"]
    assert isinstance(plugin, Prices)
    return plugin


async def run(say: Callable[[str], None]) -> None:
    """Narrate sync messages on a 3-instance cluster running on the embedded defaults."""
    async with cluster(3, plugins=[Prices]) as apps:
        a, b, c = (prices(app) for app in apps)
        names = {id(a): "A", id(b): "B", id(c): "C"}

        def seen(item: str) -> str:
            return ", ".join(f"{names[id(p)]} {p.prices.get(item, 0):.2f}" for p in (a, b, c))

        say("Three instances share one database; each keeps the price list in memory.")
        await a.set_price("tea", 3.5)
        await wait_until(lambda: b.prices.get("tea") == c.prices.get("tea") == 3.5, WAIT)
        say(f"A sets tea to 3.50 and tells the others after its commit. Tea: {seen('tea')}.")

        started = time.monotonic()
        await a.set_price("tea", 4.2)
        await wait_until(lambda: b.prices.get("tea") == c.prices.get("tea") == 4.2, WAIT)
        elapsed = (time.monotonic() - started) * 1000
        say(
            f"A raises tea to 4.20: B and C reloaded within {elapsed:.0f} ms "
            f"(A's own handler stays quiet: {a.reloads} reloads). Tea: {seen('tea')}."
        )

        await a.set_price("tea", 99.0, commit=False)
        await a.set_price("coffee", 2.8)
        await wait_until(lambda: b.prices.get("coffee") == c.prices.get("coffee") == 2.8, WAIT)
        say(
            "A tries tea at 99.00 but rolls back: the message is dropped with the "
            f"transaction, nobody reloads for it. Tea: {seen('tea')}."
        )

        apps[0].sync_message_manager.outbox.claim_lease = 0.5
        for app in apps[1:]:
            app.sync_message_manager.outbox.sweep_interval = 0.2
        async with apps[0].db.transaction() as tx:
            await tx.connection.execute(
                text("UPDATE demo_prices SET price = 5.0 WHERE item = 'tea'")
            )
            tx.after_commit(lambda: stop_abruptly(apps[0]))  # A dies before publishing
            await a.send_sync_message({"changed": "tea"}, transaction=tx)
        await wait_until(lambda: b.prices.get("tea") == c.prices.get("tea") == 5.0, WAIT)
        say(
            "A commits tea at 5.00 and crashes before publishing; the message waited in the "
            f"outbox table and a survivor sent it. Tea: B {b.prices['tea']:.2f}, C {c.prices['tea']:.2f}."
        )
