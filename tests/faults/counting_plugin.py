"""Counting: a plugin that counts the sync messages it handles and the resyncs it is asked for."""

from __future__ import annotations

from collections import Counter
from typing import Any

from accord import Application, Plugin


class Counting(Plugin):
    name = "counting"

    async def load(self) -> None:
        self.counts: Counter[int] = Counter()
        self.resyncs = 0

    async def handle_sync_message(self, message: Any) -> None:
        self.counts[message["n"]] += 1

    async def on_resync(self) -> None:
        self.resyncs += 1


def counting(app: Application) -> Counting:
    plugin = app.plugins["counting"]
    assert isinstance(plugin, Counting)
    return plugin
