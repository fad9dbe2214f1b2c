"""Async tasks: background work that runs on any instance, with progress, status and cancel.

Exports, imports and other long operations are submitted as tasks. A task
is a row in `accord_async_tasks` (its status, progress, result or error)
plus a job on the event queue: whichever instance claims the job runs the
task's function, and every instance reads the same row. A cancel is
recorded in the row and broadcast over pub/sub to the instance running it.

Example:
    from accord.plugins.async_tasks import AsyncTasksPlugin, TaskContext

    class Exports(Plugin):
        name = "exports"

        async def load(self) -> None:
            tasks = self.app.plugins["async-tasks"]
            tasks.register("export", self.export)

        async def export(self, task: TaskContext, params: dict) -> dict:
            rows = await fetch(params["collection"])
            for done, row in enumerate(rows, 1):
                await write(row)
                await task.progress(done, len(rows))
            return {"rows": len(rows)}

    app = Application(plugins=[AsyncTasksPlugin(concurrency=2), Exports])
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import enum
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    false,
    select,
)
from sqlalchemy.engine import Row
from sqlalchemy.sql import Update

from .._codec import decode, encode
from ..app import AppState
from ..event_queue import JobContext
from ..exceptions import AccordError, StateError
from ..plugin import Plugin

if TYPE_CHECKING:
    from ..db import Transaction

__all__ = ["AsyncTasksPlugin", "TaskContext", "TaskFunc", "TaskInfo", "TaskNotFound", "TaskStatus"]

TABLE = "accord_async_tasks"
#: The shortest time between two progress writes of one task, in seconds.
PROGRESS_INTERVAL = 0.2

metadata = MetaData()
tasks_table = Table(
    TABLE,
    metadata,
    Column("app", String(200), primary_key=True),
    Column("id", String(64), primary_key=True),
    Column("kind", String(200), nullable=False),
    Column("params", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("progress_done", Integer, nullable=False, default=0),
    Column("progress_total", Integer, nullable=True),
    Column("result", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("instance_id", String(200), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Index("ix_accord_async_tasks_app_status", "app", "status", "created_at"),
)


class TaskStatus(enum.StrEnum):
    """Where a task is: `pending` and `running` go on to one of the three finished states."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


UNFINISHED = (TaskStatus.PENDING.value, TaskStatus.RUNNING.value)


class TaskNotFound(AccordError, LookupError):
    """No task with that id in this application."""


@dataclasses.dataclass(frozen=True, slots=True)
class TaskInfo:
    """A task as stored, read by `AsyncTasksPlugin.get` and `list`.

    Args:
        id: the task id `submit` returned.
        kind: the registered kind that runs it.
        params: the parameters given to `submit`.
        status: pending, running, succeeded, failed or cancelled.
        progress_done: the last progress written by the runner.
        progress_total: its total, None before the first progress.
        result: what the function returned (succeeded only).
        error: the error message (failed only).
        instance_id: the instance that ran it last, None while pending.
        created_at: when it was submitted (UTC).
        started_at: when its last run started.
        finished_at: when it finished.
        cancel_requested: whether `cancel` was called on it.
    """

    id: str
    kind: str
    params: Any
    status: TaskStatus
    progress_done: int
    progress_total: int | None
    result: Any
    error: str | None
    instance_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested: bool

    @property
    def finished(self) -> bool:
        return self.status not in UNFINISHED

    @classmethod
    def from_row(cls, row: Row[Any]) -> TaskInfo:
        return cls(
            id=row.id,
            kind=row.kind,
            params=decode(row.params),
            status=TaskStatus(row.status),
            progress_done=row.progress_done,
            progress_total=row.progress_total,
            result=None if row.result is None else decode(row.result),
            error=row.error,
            instance_id=row.instance_id,
            created_at=_utc(row.created_at),
            started_at=_utc(row.started_at),
            finished_at=_utc(row.finished_at),
            cancel_requested=bool(row.cancel_requested),
        )


class TaskContext:
    """What a task function learns about its task, and how it reports progress.

    Args:
        plugin: the plugin running the task.
        id: the task id.
        kind: the task's kind.
        retried: earlier deliveries of the task's job (a crashed instance's run counts).
    """

    def __init__(self, plugin: AsyncTasksPlugin, id: str, kind: str, retried: int) -> None:
        self.id = id
        self.kind = kind
        self.retried = retried
        self._plugin = plugin
        self._reported: tuple[int, int] | None = None
        self._written_at = -PROGRESS_INTERVAL

    def __repr__(self) -> str:
        return f"<TaskContext {self.kind} {self.id}>"

    async def progress(self, done: int, total: int) -> None:
        """Record that `done` of `total` units are done; every instance can read it.

        Writes at most once every 0.2 s; the last value is always stored,
        at once when `done` reaches `total`, else when the task ends.

        Args:
            done: units done so far, ≥ 0.
            total: units in all, ≥ `done`.
        """
        for name, value in (("done", done), ("total", total)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"task {self.id}: progress {name} must be an int, got {value!r}")
        if not 0 <= done <= total:
            raise ValueError(
                f"task {self.id}: progress needs 0 <= done <= total, got {done}/{total}"
            )
        self._reported = (done, total)
        now = time.monotonic()
        if done < total and now - self._written_at < PROGRESS_INTERVAL:
            return
        self._written_at = now
        await self._plugin._write_progress(self.id, done, total)

    @property
    def last_progress(self) -> tuple[int, int] | None:
        """The last `(done, total)` reported, written or not."""
        return self._reported


#: A task function: `await fn(task, params)` returns the task's JSON-compatible result.
TaskFunc = Callable[[TaskContext, Any], Awaitable[Any]]


class _Run:
    """One task running on this instance: its coroutine and whether a cancel reached it."""

    __slots__ = ("cancelled", "future")

    def __init__(self) -> None:
        self.future: asyncio.Future[Any] | None = None
        self.cancelled = False

    def cancel(self) -> None:
        if self.future is not None and self.future.done():
            return
        self.cancelled = True
        if self.future is not None:
            self.future.cancel()


class AsyncTasksPlugin(Plugin):
    """Background tasks run on any instance, with persisted status, progress and cancel.

    Args:
        concurrency: tasks this instance runs at once at most. Default 2.
        **options: kept as `self.options`.
    """

    name = "async-tasks"

    def __init__(self, *, concurrency: int = 2, **options: Any) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"async-tasks: concurrency must be an int >= 1, got {concurrency!r}")
        super().__init__(**options)
        self.concurrency = concurrency
        self._kinds: dict[str, TaskFunc] = {}
        self._running: dict[str, _Run] = {}

    @property
    def channel(self) -> str:
        """The event queue channel of the tasks' jobs."""
        return self.name

    @property
    def cancel_channel(self) -> str:
        """The pub/sub channel that carries cancels to the running instance."""
        return f"{self.name}.cancel"

    def register(self, kind: str, fn: TaskFunc) -> None:
        """Run `await fn(task, params)` for tasks of `kind`; call it in a plugin's `load`.

        Every instance must register the same kinds: any of them may run any
        task. A job is delivered at least once, so `fn` should be idempotent
        (a task whose instance crashed runs again elsewhere).

        Args:
            kind: the task kind, a non-empty string.
            fn: async callable `(task: TaskContext, params) -> JSON-compatible result`.
        """
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"async-tasks: a task kind must be a non-empty string, got {kind!r}")
        if not callable(fn):
            raise TypeError(f"async-tasks: the function of kind {kind!r} is not callable: {fn!r}")
        if kind in self._kinds:
            raise ValueError(f"async-tasks: kind {kind!r} is already registered")
        if self._app is not None and self.app.state is AppState.STARTED:
            raise StateError(
                f"async-tasks: register kind {kind!r} in a plugin's load, before the application starts"
            )
        self._kinds[kind] = fn

    # Lifecycle.

    async def load(self) -> None:
        self.app.event_queue.subscribe(
            self.channel, process=self._process, concurrency=self.concurrency
        )
        await self.app.pub_sub_manager.subscribe(self.cancel_channel, self._on_cancel)

    async def install(self) -> None:
        await self.db.create_tables(metadata)

    async def after_start(self) -> None:
        if await self.db.missing_tables(metadata):
            raise StateError(
                f"async-tasks: the table {TABLE} is missing although the plugin is installed; "
                f"delete the row (app={self.app.name!r}, name={self.name!r}) from accord_plugins "
                "so that the next start installs it again"
            )

    # The API.

    async def submit(
        self, kind: str, params: Any = None, *, transaction: Transaction | None = None
    ) -> str:
        """Queue a task of `kind`; returns its id. Some instance runs it soon after.

        Args:
            kind: a registered kind.
            params: JSON-compatible data given to the task's function.
            transaction: an `app.db` transaction; the task exists only if it commits.
                Default: a transaction of its own.
        """
        if kind not in self._kinds:
            known = ", ".join(sorted(self._kinds)) or "none"
            raise ValueError(
                f"async-tasks: unknown task kind {kind!r} (registered: {known}); "
                "register it with register(kind, fn) in a plugin's load"
            )
        body = encode(params, what=f"params of an async task of kind {kind!r}").decode()
        task_id = uuid.uuid4().hex
        values = {
            "app": self.app.name,
            "id": task_id,
            "kind": kind,
            "params": body,
            "status": TaskStatus.PENDING.value,
            "progress_done": 0,
            "created_at": datetime.now(UTC),
            "cancel_requested": False,
        }
        async with transaction if transaction is not None else self.db.transaction() as tx:
            await tx.connection.execute(tasks_table.insert().values(**values))
            await self.app.event_queue.publish(
                self.channel, {"id": task_id}, job_id=task_id, timeout=0, transaction=tx
            )
        self.log.info("task %s (%s) submitted", task_id, kind)
        return task_id

    async def cancel(self, task_id: str) -> bool:
        """Cancel a task: a pending one never runs, a running one is cancelled where it runs.

        Returns:
            True if the cancel was recorded; False if the task had already finished.
            A running task that finishes before the cancel reaches it keeps its outcome.
        """
        async with self.db.transaction() as tx:
            requested = await tx.connection.execute(
                self._update(task_id, tasks_table.c.status.in_(UNFINISHED)).values(
                    cancel_requested=True
                )
            )
            if requested.rowcount == 0:
                await self._read(tx, task_id)  # TaskNotFound if there is no such task
                return False
            stopped = await tx.connection.execute(
                self._update(task_id, tasks_table.c.status == TaskStatus.PENDING.value).values(
                    status=TaskStatus.CANCELLED.value, finished_at=datetime.now(UTC)
                )
            )
            if stopped.rowcount:
                self.log.info("task %s cancelled before it ran", task_id)
            else:
                tx.after_commit(lambda: self._broadcast_cancel(task_id))
        return True

    async def get(self, task_id: str) -> TaskInfo:
        """The task's current state, as every instance sees it; `TaskNotFound` if none."""
        async with self.db.transaction() as tx:
            return await self._read(tx, task_id)

    async def list(
        self, status: TaskStatus | str | None = None, limit: int = 100
    ) -> builtins.list[TaskInfo]:
        """This application's tasks, newest first.

        Args:
            status: only tasks in this status. Default: all.
            limit: how many at most, ≥ 1. Default 100.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"async-tasks: limit must be an int >= 1, got {limit!r}")
        query = select(tasks_table).where(tasks_table.c.app == self.app.name)
        if status is not None:
            try:
                status = TaskStatus(status)
            except ValueError:
                raise ValueError(
                    f"async-tasks: unknown status {status!r}; use one of "
                    + ", ".join(s.value for s in TaskStatus)
                ) from None
            query = query.where(tasks_table.c.status == status.value)
        query = query.order_by(tasks_table.c.created_at.desc(), tasks_table.c.id).limit(limit)
        async with self.db.transaction() as tx:
            rows = await tx.connection.execute(query)
            return [TaskInfo.from_row(row) for row in rows]

    # Running tasks (the queue consumer).

    async def _process(self, payload: Any, job: JobContext) -> None:
        task_id = str(payload["id"])
        run = self._running.setdefault(task_id, _Run())
        try:
            task = await self._start(task_id)
            if task is None:
                return
            fn = self._kinds.get(task.kind)
            if fn is None:
                message = f"no function for kind {task.kind!r} on instance {self.app.instance_id}"
                await self._finish(task_id, TaskStatus.FAILED, None, error=message)
                return
            context = TaskContext(self, task_id, task.kind, job.retried)
            run.future = asyncio.ensure_future(_call(fn, context, task.params))
            if run.cancelled:
                run.future.cancel()
            await self._await(run, context)
        finally:
            if run.future is not None and not run.future.done():
                run.future.cancel()
            self._running.pop(task_id, None)

    async def _await(self, run: _Run, context: TaskContext) -> None:
        assert run.future is not None
        result: Any = None
        error: str | None = None
        try:
            result = await run.future
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not run.cancelled or (current is not None and current.cancelling()):
                raise  # the application is stopping: the job is released and runs again
        except Exception as exc:
            error = str(exc) or type(exc).__name__
        if run.cancelled:
            await self._finish(context.id, TaskStatus.CANCELLED, context)
        elif error is not None:
            self.log.warning("task %s (%s) failed: %s", context.id, context.kind, error)
            await self._finish(context.id, TaskStatus.FAILED, context, error=error)
        else:
            try:
                body = encode(result, what=f"the result of task {context.id}").decode()
            except AccordError as exc:
                self.log.warning("task %s (%s) failed: %s", context.id, context.kind, exc)
                await self._finish(context.id, TaskStatus.FAILED, context, error=str(exc))
                return
            await self._finish(context.id, TaskStatus.SUCCEEDED, context, result=body)

    async def _start(self, task_id: str) -> TaskInfo | None:
        """Mark the task running here; None (skip it) if it finished or a cancel came first."""
        async with self.db.transaction() as tx:
            started = await tx.connection.execute(
                self._update(
                    task_id,
                    tasks_table.c.status.in_(UNFINISHED),
                    tasks_table.c.cancel_requested == false(),
                ).values(
                    status=TaskStatus.RUNNING.value,
                    instance_id=self.app.instance_id,
                    started_at=datetime.now(UTC),
                )
            )
            try:
                task = await self._read(tx, task_id)
            except TaskNotFound:
                self.log.warning("task %s: no such row; its job is dropped", task_id)
                return None
            if not started.rowcount and not task.finished:
                # Cancelled while its last runner was gone (a crash or a stop): close it now.
                await tx.connection.execute(
                    self._update(task_id, tasks_table.c.status.in_(UNFINISHED)).values(
                        status=TaskStatus.CANCELLED.value, finished_at=datetime.now(UTC)
                    )
                )
        if not started.rowcount:
            self.log.info("task %s was %s; skipped", task_id, task.status.value)
            return None
        self.log.info("task %s (%s) running", task_id, task.kind)
        return task

    async def _finish(
        self,
        task_id: str,
        status: TaskStatus,
        context: TaskContext | None,
        *,
        result: str | None = None,
        error: str | None = None,
    ) -> None:
        values: dict[str, Any] = {
            "status": status.value,
            "result": result,
            "error": error,
            "finished_at": datetime.now(UTC),
        }
        if context is not None and context.last_progress is not None:
            values["progress_done"], values["progress_total"] = context.last_progress
        async with self.db.transaction() as tx:
            await tx.connection.execute(
                self._update(
                    task_id,
                    tasks_table.c.status == TaskStatus.RUNNING.value,
                    tasks_table.c.instance_id == self.app.instance_id,
                ).values(**values)
            )
        self.log.info("task %s %s", task_id, status.value)

    async def _write_progress(self, task_id: str, done: int, total: int) -> None:
        async with self.db.transaction() as tx:
            written = await tx.connection.execute(
                self._update(
                    task_id,
                    tasks_table.c.status == TaskStatus.RUNNING.value,
                    tasks_table.c.cancel_requested == false(),
                ).values(progress_done=done, progress_total=total)
            )
        if not written.rowcount:
            # A cancel was requested and its broadcast has not arrived (or was missed).
            self.log.info("task %s: cancel found at a progress write", task_id)
            self._cancel_here(task_id)

    # Cancelling a running task.

    async def _broadcast_cancel(self, task_id: str) -> None:
        await self.app.pub_sub_manager.publish(
            self.cancel_channel, {"id": task_id}, skip_self=False
        )

    async def _on_cancel(self, message: Any) -> None:
        if isinstance(message, dict):
            self._cancel_here(str(message.get("id")))

    def _cancel_here(self, task_id: str) -> None:
        run = self._running.get(task_id)
        if run is not None:
            self.log.info("task %s: cancelling its run on this instance", task_id)
            run.cancel()

    # SQL.

    def _update(self, task_id: str, *conditions: Any) -> Update:
        return tasks_table.update().where(
            tasks_table.c.app == self.app.name, tasks_table.c.id == task_id, *conditions
        )

    async def _read(self, tx: Transaction, task_id: str) -> TaskInfo:
        rows = await tx.connection.execute(
            select(tasks_table).where(
                tasks_table.c.app == self.app.name, tasks_table.c.id == task_id
            )
        )
        row = rows.first()
        if row is None:
            raise TaskNotFound(f"async-tasks: no task {task_id!r} in application {self.app.name!r}")
        return TaskInfo.from_row(row)


async def _call(fn: TaskFunc, context: TaskContext, params: Any) -> Any:
    # A function that is not async fails the task instead of the queue job.
    return await fn(context, params)


def _utc(value: datetime | None) -> Any:
    # SQLite gives back naive datetimes; they were written in UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value
