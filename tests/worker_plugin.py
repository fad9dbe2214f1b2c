"""Plugins that `accord worker` and `accord serve` load in tests/test_cli.py (`worker_plugin:Recorder`).

Recorder consumes the channel named by RECORDER_CHANNEL and records each job in the
shared Redis cache `recorder`: `started:<n>` when a run begins, `done:<n>` (the instance id)
when it ends; a job sleeps `payload["sleep"]` seconds in between.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from accord import JobContext, Plugin

CACHE = "recorder"


class Recorder(Plugin):
    name = "recorder"

    async def load(self) -> None:
        self.cache = await self.app.cache_manager.create_cache(name=CACHE, store="redis")
        self.app.event_queue.subscribe(
            os.environ["RECORDER_CHANNEL"], process=self.process, concurrency=4
        )

    async def process(self, payload: Any, ctx: JobContext) -> None:
        await self.cache.set(f"started:{payload['n']}", self.app.instance_id, ttl=600)
        await asyncio.sleep(payload.get("sleep", 0))
        await self.cache.set(f"done:{payload['n']}", self.app.instance_id, ttl=600)


def not_a_plugin() -> None:
    """A module attribute that is not a Plugin class, for the bad-spec tests."""
