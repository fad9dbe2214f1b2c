"""A queue worker process for the fault tests, and the helpers the tests drive it with.

Run: python queue_worker.py LOG COUNTERS (settings from ACCORD_* variables; channel and
concurrency from QUEUE_CHANNEL and QUEUE_CONCURRENCY). Each job sleeps `payload["ms"]`
milliseconds. The worker appends one line per event to LOG with a single
O_APPEND write, so lines survive `kill -9` whole:

    R <pid>                      ready (consumers started)
    S <job id> <retried> <pid>   a run started
    D <job id> <pid>             a run returned (its acknowledgement may still fail)

On SIGTERM it stops gracefully and writes its counters as JSON to COUNTERS.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from accord import Settings

WORKER = Path(__file__)


async def main(log_path: str, counters_path: str) -> None:
    from accord import Application, Settings
    from accord.event_queue import JobContext

    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pid = os.getpid()

    def note(line: str) -> None:
        os.write(fd, (line + "\n").encode())

    async def process(payload: Any, ctx: JobContext) -> None:
        note(f"S {ctx.id} {ctx.retried} {pid}")
        await asyncio.sleep(payload["ms"] / 1000)
        note(f"D {ctx.id} {pid}")

    app = Application(settings=Settings.from_env())
    app.event_queue.subscribe(
        os.environ["QUEUE_CHANNEL"],
        process=process,
        concurrency=int(os.environ.get("QUEUE_CONCURRENCY", "4")),
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await app.start()
    note(f"R {pid}")
    await stop.wait()
    await app.stop()
    Path(counters_path).write_text(json.dumps(app.event_queue.counters))
    os.close(fd)


# Helpers for the tests (imported by test_queue_*.py).


@dataclass
class Events:
    """What the workers' log says: who started and finished which job, and how often."""

    ready: set[int] = field(default_factory=set)
    starts: dict[str, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))
    done: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def read(cls, path: Path) -> Events:
        events = cls()
        if not path.exists():
            return events
        for line in path.read_text().splitlines():
            parts = line.split()
            if parts[0] == "R":
                events.ready.add(int(parts[1]))
            elif parts[0] == "S":
                events.starts[parts[1]].append((int(parts[2]), int(parts[3])))
            elif parts[0] == "D":
                events.done[parts[1]].append(int(parts[2]))
        return events

    def unfinished(self, pid: int) -> set[str]:
        """Jobs `pid` started and never finished."""
        started = {job for job, runs in self.starts.items() if any(p == pid for _, p in runs)}
        finished = {job for job, pids in self.done.items() if pid in pids}
        return started - finished

    def duplicate_runs(self) -> int:
        return sum(len(runs) - 1 for runs in self.starts.values())

    def duplicate_completions(self) -> int:
        return sum(len(pids) - 1 for pids in self.done.values())

    def redeliveries_unmarked(self) -> list[str]:
        """Jobs whose second or later run did not see `ctx.retried` ≥ 1."""
        return [job for job, runs in self.starts.items() if any(r < 1 for r, _ in runs[1:])]

    def done_count(self) -> Counter[str]:
        return Counter({job: len(pids) for job, pids in self.done.items()})


def worker_env(
    queue_url: str,
    app_name: str,
    folder: Path,
    channel: str,
    *,
    lease: float,
    check_interval: float,
    concurrency: int,
    **extra: str,
) -> dict[str, str]:
    """The ACCORD_* settings of the workers: the queue under test, a memory bus, local locks."""
    return {
        "ACCORD_APP_NAME": app_name,
        "ACCORD_STORAGE": str(folder),
        "ACCORD_QUEUE_URL": queue_url,
        "ACCORD_PUBSUB_URL": "memory://",
        "ACCORD_LOCK_URL": "local",
        "ACCORD_QUEUE_LEASE": str(lease),
        "ACCORD_QUEUE_CHECK_INTERVAL": str(check_interval),
        "QUEUE_CHANNEL": channel,
        "QUEUE_CONCURRENCY": str(concurrency),
        **extra,
    }


def publisher_settings(queue_url: str, app_name: str, folder: Path) -> Settings:
    """The settings of the test's own instance, which publishes and reads the stats."""
    from accord import Settings

    return Settings(
        app_name=app_name,
        storage=str(folder),
        queue_url=queue_url,
        lock_url=f"memory://{app_name}",
    )


async def spawn(env: dict[str, str], log: Path, counters: Path) -> asyncio.subprocess.Process:
    """Start one worker process."""
    return await asyncio.create_subprocess_exec(
        sys.executable, str(WORKER), str(log), str(counters), env={**os.environ, **env}
    )


async def wait_ready(log: Path, pid: int, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pid not in Events.read(log).ready:
        if loop.time() > deadline:
            raise TimeoutError(f"worker {pid} did not start within {timeout} s")
        await asyncio.sleep(0.05)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
