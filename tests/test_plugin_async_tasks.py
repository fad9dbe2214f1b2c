"""The async tasks plugin on a three-instance cluster: run once, progress, cancel, failures."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text

from accord import Application, Plugin, PluginError, SerializationError, Settings, StateError
from accord.plugins.async_tasks import (
    PROGRESS_INTERVAL,
    AsyncTasksPlugin,
    TaskContext,
    TaskNotFound,
    TaskStatus,
)
from accord.testing import cluster, wait_until
from conftest import unique
from servers import delete_queue_keys

BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]
WAIT = 20.0


class Workload:
    """The task functions of one test, shared by its three instances, and what they saw."""

    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()
        self.retried: dict[str, int] = {}
        self.cancelled: set[str] = set()
        self.gate = asyncio.Event()
        self.progress_writes = 0
        self.loop_seconds = 0.0

    async def echo(self, task: TaskContext, params: Any) -> Any:
        self.runs[task.id] += 1
        return {"echo": params}

    async def block(self, task: TaskContext, params: Any) -> str:
        self.runs[task.id] += 1
        self.retried[task.id] = task.retried
        await task.progress(3, 10)
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled.add(task.id)
            raise
        await task.progress(10, 10)
        return "done"

    async def fail(self, task: TaskContext, params: Any) -> None:
        self.runs[task.id] += 1
        raise RuntimeError(params["message"])

    async def unencodable(self, task: TaskContext, params: Any) -> Any:
        self.runs[task.id] += 1
        return {1, 2}

    async def tight_loop(self, task: TaskContext, params: Any) -> int:
        self.runs[task.id] += 1
        began = time.monotonic()
        for done in range(1, params["n"] + 1):
            await task.progress(done, params["n"])
            await asyncio.sleep(0)
        self.loop_seconds = time.monotonic() - began
        return int(params["n"])

    def plugin(self) -> type[Plugin]:
        work = self

        class Kinds(Plugin):
            name = "kinds"

            async def load(self) -> None:
                tasks = tasks_of(self.app)
                for kind in ("echo", "block", "fail", "unencodable", "tight_loop"):
                    tasks.register(kind, getattr(work, kind))

        return Kinds


def tasks_of(app: Application) -> AsyncTasksPlugin:
    plugin = app.plugins["async-tasks"]
    assert isinstance(plugin, AsyncTasksPlugin)
    return plugin


@asynccontextmanager
async def tasks_cluster(
    backend: str, work: Workload, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[list[Application]]:
    """Three instances; the tasks table in the cluster's shared SQLite file, or on PostgreSQL."""
    name = unique("tasks")
    plugins = [AsyncTasksPlugin, work.plugin()]
    if backend == "memory":
        async with cluster(3, plugins=plugins, name=name) as apps:
            yield apps
    elif backend == "redis":
        url = request.getfixturevalue("redis_url")
        try:
            async with cluster(3, plugins=plugins, name=name, url=url) as apps:
                yield apps
        finally:
            await delete_queue_keys(url, name)
    else:
        url = request.getfixturevalue("postgres_url")
        db_url = url.replace("postgresql://", "postgresql+asyncpg://", 1)
        settings = Settings(app_name=name, storage=str(tmp_path), db_url=db_url)
        async with cluster(3, plugins=plugins, settings=settings, url=url) as apps:
            yield apps


async def status_is(app: Application, task_id: str, status: TaskStatus) -> bool:
    return (await tasks_of(app).get(task_id)).status == status


@pytest.mark.parametrize(
    "backend", [*BACKENDS, pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_ten_tasks_submitted_on_one_instance_all_succeed_once(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    work = Workload()
    async with tasks_cluster(backend, work, request, tmp_path) as apps:
        ids = [await tasks_of(apps[0]).submit("echo", {"n": n}) for n in range(10)]
        reader = tasks_of(apps[2])

        async def all_succeeded() -> bool:
            return len(await reader.list(status="succeeded")) == 10

        await wait_until(all_succeeded, WAIT)
        infos = {task_id: await reader.get(task_id) for task_id in ids}

    assert work.runs == {task_id: 1 for task_id in ids}
    members = {app.instance_id for app in apps}
    for n, task_id in enumerate(ids):
        info = infos[task_id]
        assert info.kind == "echo" and info.params == {"n": n}
        assert info.result == {"echo": {"n": n}} and info.error is None
        assert info.instance_id in members
        assert info.finished and info.finished_at is not None and info.started_at is not None
        assert info.created_at <= info.started_at <= info.finished_at


@pytest.mark.parametrize("backend", BACKENDS)
async def test_progress_written_by_the_runner_is_visible_from_another_instance(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    work = Workload()
    async with tasks_cluster(backend, work, request, tmp_path) as apps:
        task_id = await tasks_of(apps[0]).submit("block")
        await wait_until(lambda: status_is(apps[0], task_id, TaskStatus.RUNNING), WAIT)
        runner = (await tasks_of(apps[0]).get(task_id)).instance_id
        other = next(app for app in apps if app.instance_id != runner)

        async def three_of_ten() -> bool:
            info = await tasks_of(other).get(task_id)
            return (info.progress_done, info.progress_total) == (3, 10)

        await wait_until(three_of_ten, WAIT)
        work.gate.set()
        await wait_until(lambda: status_is(other, task_id, TaskStatus.SUCCEEDED), WAIT)
        info = await tasks_of(other).get(task_id)

    assert (info.progress_done, info.progress_total, info.result) == (10, 10, "done")
    assert info.instance_id == runner


async def test_a_tight_progress_loop_writes_a_few_times_and_stores_the_last_value() -> None:
    work = Workload()
    writes = 0

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        nonlocal writes
        if statement.startswith("UPDATE accord_async_tasks SET progress_done"):
            writes += 1

    async with cluster(3, plugins=[AsyncTasksPlugin, work.plugin()], name=unique("tasks")) as apps:
        for app in apps:
            event.listen(app.db.engine.sync_engine, "before_cursor_execute", count)
        task_id = await tasks_of(apps[0]).submit("tight_loop", {"n": 2000})
        await wait_until(lambda: status_is(apps[1], task_id, TaskStatus.SUCCEEDED), WAIT)
        info = await tasks_of(apps[1]).get(task_id)

    assert (info.progress_done, info.progress_total, info.result) == (2000, 2000, 2000)
    # One write per interval at most, plus the first and the final one.
    assert 1 <= writes <= 2 + work.loop_seconds / PROGRESS_INTERVAL
    assert writes < 2000


@pytest.mark.parametrize("backend", BACKENDS)
async def test_cancel_from_another_instance_cancels_the_running_coroutine(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    work = Workload()
    async with tasks_cluster(backend, work, request, tmp_path) as apps:
        task_id = await tasks_of(apps[0]).submit("block")
        await wait_until(lambda: task_id in work.runs, WAIT)
        await wait_until(lambda: status_is(apps[0], task_id, TaskStatus.RUNNING), WAIT)
        runner = (await tasks_of(apps[0]).get(task_id)).instance_id
        canceller = next(app for app in apps if app.instance_id != runner)

        assert await tasks_of(canceller).cancel(task_id) is True
        await wait_until(lambda: status_is(apps[0], task_id, TaskStatus.CANCELLED), WAIT)
        info = await tasks_of(canceller).get(task_id)
        again = await tasks_of(canceller).cancel(task_id)

    assert task_id in work.cancelled  # the function saw CancelledError
    assert info.cancel_requested and info.finished_at is not None
    assert info.instance_id == runner and info.result is None
    assert again is False  # a finished task cannot be cancelled


@pytest.mark.parametrize("backend", BACKENDS)
async def test_cancel_of_a_pending_task_means_it_never_runs(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    work = Workload()
    async with tasks_cluster(backend, work, request, tmp_path) as apps:
        # Three instances at concurrency 2: six blocking tasks take every slot.
        blockers = [await tasks_of(apps[0]).submit("block") for _ in range(6)]

        async def all_running() -> bool:
            return len(await tasks_of(apps[0]).list(status=TaskStatus.RUNNING)) == 6

        await wait_until(all_running, WAIT)
        task_id = await tasks_of(apps[1]).submit("echo", {"never": True})
        assert await status_is(apps[0], task_id, TaskStatus.PENDING)

        assert await tasks_of(apps[2]).cancel(task_id) is True
        info = await tasks_of(apps[0]).get(task_id)
        assert info.status == TaskStatus.CANCELLED and info.cancel_requested

        work.gate.set()

        async def queue_empty() -> bool:
            stats = await apps[0].event_queue.stats("async-tasks")
            return (stats.queued, stats.delayed, stats.running, stats.dead) == (0, 0, 0, 0)

        await wait_until(queue_empty, WAIT)
        finished = {t: (await tasks_of(apps[1]).get(t)).status for t in blockers}
        after = await tasks_of(apps[1]).get(task_id)

    assert work.runs[task_id] == 0
    assert after.status == TaskStatus.CANCELLED and after.instance_id is None
    assert set(finished.values()) == {TaskStatus.SUCCEEDED}


async def test_a_task_whose_instance_stops_runs_again_elsewhere(tmp_path: Path) -> None:
    work = Workload()
    name = unique("tasks")
    bus = f"memory://{name}"
    settings = Settings(
        app_name=name,
        storage=str(tmp_path),
        pubsub_url=bus,
        queue_url=bus,
        lock_url=bus,
        stop_grace=0.2,
    )
    async with cluster(3, plugins=[AsyncTasksPlugin, work.plugin()], settings=settings) as apps:
        task_id = await tasks_of(apps[0]).submit("block")
        await wait_until(lambda: task_id in work.runs, WAIT)
        await wait_until(lambda: status_is(apps[0], task_id, TaskStatus.RUNNING), WAIT)
        first = (await tasks_of(apps[0]).get(task_id)).instance_id
        runner = next(app for app in apps if app.instance_id == first)
        await runner.stop()  # cannot wait for the task: cancels it and puts its job back
        reader = next(app for app in apps if app is not runner)
        await wait_until(lambda: work.runs[task_id] == 2, WAIT)
        work.gate.set()
        await wait_until(lambda: status_is(reader, task_id, TaskStatus.SUCCEEDED), WAIT)
        info = await tasks_of(reader).get(task_id)

    assert task_id in work.cancelled  # the first run was cancelled by the stop
    assert work.retried[task_id] == 1
    assert info.instance_id != first and info.result == "done" and not info.cancel_requested


async def test_a_failing_function_fails_the_task_with_its_message() -> None:
    work = Workload()
    async with cluster(3, plugins=[AsyncTasksPlugin, work.plugin()], name=unique("tasks")) as apps:
        failing = await tasks_of(apps[0]).submit("fail", {"message": "disk full"})
        bad_result = await tasks_of(apps[0]).submit("unencodable")
        await wait_until(lambda: status_is(apps[1], failing, TaskStatus.FAILED), WAIT)
        await wait_until(lambda: status_is(apps[1], bad_result, TaskStatus.FAILED), WAIT)
        failed = await tasks_of(apps[2]).get(failing)
        unencodable = await tasks_of(apps[2]).get(bad_result)
        listed = {info.id for info in await tasks_of(apps[2]).list(status="failed")}

    assert failed.error == "disk full" and failed.result is None
    assert unencodable.error is not None and "not JSON-compatible" in unencodable.error
    assert work.runs == {failing: 1, bad_result: 1}  # a failure is not retried
    assert listed == {failing, bad_result}


@pytest.mark.parametrize("backend", BACKENDS)
async def test_submit_in_a_rolled_back_transaction_leaves_no_row_and_no_run(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    work = Workload()
    async with tasks_cluster(backend, work, request, tmp_path) as apps:
        tasks = tasks_of(apps[0])
        with pytest.raises(RuntimeError, match="changed my mind"):
            async with apps[0].db.transaction() as tx:
                dropped = await tasks.submit("echo", {"n": 1}, transaction=tx)
                raise RuntimeError("changed my mind")
        async with apps[0].db.transaction() as tx:
            kept = await tasks.submit("echo", {"n": 2}, transaction=tx)
        await wait_until(lambda: status_is(apps[1], kept, TaskStatus.SUCCEEDED), WAIT)

        async def queue_empty() -> bool:
            stats = await apps[0].event_queue.stats("async-tasks")
            return (stats.queued, stats.delayed, stats.running) == (0, 0, 0)

        await wait_until(queue_empty, WAIT)
        with pytest.raises(TaskNotFound, match=dropped):
            await tasks_of(apps[2]).get(dropped)
        listed = [info.id for info in await tasks_of(apps[2]).list()]

    assert listed == [kept]
    assert work.runs == {kept: 1}


async def test_bad_input_is_refused_and_writes_nothing() -> None:
    work = Workload()
    async with cluster(1, plugins=[AsyncTasksPlugin, work.plugin()], name=unique("tasks")) as apps:
        tasks = tasks_of(apps[0])
        with pytest.raises(ValueError, match="unknown task kind 'export'.*registered: block"):
            await tasks.submit("export", {})
        with pytest.raises(SerializationError, match="params of an async task"):
            await tasks.submit("echo", {"ids": {1, 2}})
        with pytest.raises(TaskNotFound, match="no task 'nope'"):
            await tasks.cancel("nope")
        with pytest.raises(ValueError, match="unknown status 'done'"):
            await tasks.list(status="done")
        with pytest.raises(ValueError, match="limit must be an int >= 1"):
            await tasks.list(limit=0)
        with pytest.raises(StateError, match="in a plugin's load"):
            tasks.register("late", work.echo)
        with pytest.raises(ValueError, match="already registered"):
            tasks.register("echo", work.echo)
        listed = await tasks.list()

    assert listed == []
    with pytest.raises(ValueError, match="concurrency must be an int >= 1"):
        AsyncTasksPlugin(concurrency=0)


async def test_a_missing_table_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    settings = Settings(app_name=unique("tasks"), storage=str(tmp_path))
    first = Application(plugins=[AsyncTasksPlugin], settings=settings)
    async with first, first.db.transaction() as tx:
        await tx.connection.execute(text("DROP TABLE accord_async_tasks"))

    again = Application(plugins=[AsyncTasksPlugin], settings=settings)
    with pytest.raises(PluginError, match="table accord_async_tasks is missing") as caught:
        await again.start()
    assert caught.value.plugin == "async-tasks"
