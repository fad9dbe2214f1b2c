"""Demo steps for the lifecycle and the database."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import text

from ..plugin import Plugin
from ..testing import cluster


class Notes(Plugin):
    name = "notes"
    installs = 0

    async def after_add(self) -> None:
        self.hooks = ["after_add"]

    async def before_load(self) -> None:
        self.hooks.append("before_load")

    async def load(self) -> None:
        self.hooks.append("load")

    async def install(self) -> None:
        self.hooks.append("install")
        type(self).installs += 1
        async with self.db.transaction() as tx:
            await tx.connection.execute(
                text("CREATE TABLE IF NOT EXISTS demo_notes (id INTEGER PRIMARY KEY, body TEXT)")
            )

    async def after_start(self) -> None:
        self.hooks.append("after_start")


async def lifecycle(say: Callable[[str], None]) -> None:
    async with cluster(3, plugins=[Notes], name="demo") as apps:
        for app in apps:
            say(f"instance {app.instance_id} is {app.state.value}")
        hooks = [app.plugins["notes"].hooks for app in apps]  # type: ignore[attr-defined]
        say("hooks on instance 1: " + " → ".join(hooks[0]))
        say("hooks on instance 2: " + " → ".join(hooks[1]))
        say(
            f"`install` ran {Notes.installs} time(s) for the shared database, not once per instance"
        )
        members = await apps[0].cluster.instances()
        say(f"the cluster's membership lists {len(members)} live instances, each with a heartbeat")
    say("all three stopped: queue drained, pub/sub closed, locks released, database closed")


async def database(say: Callable[[str], None]) -> None:
    async with cluster(3, plugins=[Notes], name="demo") as apps:
        first, second, _ = apps
        committed: list[str] = []
        async with first.db.transaction() as tx:
            await tx.connection.execute(text("INSERT INTO demo_notes (body) VALUES ('hello')"))
            tx.after_commit(lambda: committed.append("after_commit ran"))
            say(
                f"instance 1 wrote a row inside a transaction; callbacks so far: {committed or 'none'}"
            )
        say(f"it committed, then: {committed[0]}")
        async with second.db.transaction() as tx:
            body = (await tx.connection.execute(text("SELECT body FROM demo_notes"))).scalar()
        say(f"instance 2 reads the shared database: {body!r}")
        try:
            async with first.db.transaction() as tx:
                await tx.connection.execute(text("INSERT INTO demo_notes (body) VALUES ('oops')"))
                tx.after_commit(lambda: committed.append("never"))
                raise RuntimeError("changed my mind")
        except RuntimeError:
            pass
        async with second.db.transaction() as tx:
            count = (await tx.connection.execute(text("SELECT count(*) FROM demo_notes"))).scalar()
        say(f"a rolled-back write left {count} row(s) and its after_commit callback never ran")
