"""The event queue's values: jobs as adapters see them, job contexts, dead letters, counts."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from ._codec import decode
from .exceptions import AccordError, QueueError

DEFAULT_TIMEOUT = 15.0
DEFAULT_BACKOFF = 1.0
DEFAULT_BACKOFF_MAX = 300.0
DEFAULT_MAX_RECOVERIES = 5
DEFAULT_INTERVAL = 0.25


class QueueState(enum.Enum):
    NEW = "new"
    CONNECTED = "connected"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclasses.dataclass(slots=True)
class Job:
    """One job as adapters store and return it.

    Counters on a job handed to an adapter are stored as given: the manager
    has already updated them. `recover()` is the one place where an adapter
    changes counters itself (`attempt` and `recoveries` go up by one).

    Args:
        id: the job id, unique per channel while the job is pending, running or dead.
        channel: the full channel name (already prefixed by the manager).
        body: encoded `{"payload": ..., "options": {...}}`; opaque to adapters.
        enqueued_at: wall-clock time (`time.time()`) of the first publish.
        attempt: deliveries before this one, whatever ended them (`ctx.retried`).
        failures: deliveries that ended in an error or a timeout.
        recoveries: deliveries that ended because the lease expired (a dead worker).
        error: the last failure, for retries and dead letters.
        lease: the adapter's handle on this delivery, set by `claim`; "" otherwise.
        failed_at: wall-clock time the job was dead-lettered.
        keyed: the id must be checked on enqueue: the publisher chose it, or the
            job comes through the outbox (which may send a row twice). Adapters
            for which the check is free may check every id.
    """

    id: str
    channel: str
    body: bytes
    enqueued_at: float
    attempt: int = 0
    failures: int = 0
    recoveries: int = 0
    error: str | None = None
    lease: str = ""
    failed_at: float | None = None
    keyed: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class QueueStats:
    """How many jobs of one channel are in each state, as the adapter sees them now."""

    queued: int
    delayed: int
    running: int
    dead: int


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    """A job that exhausted its retries (or kept killing its worker), as `dead_letters` lists it."""

    id: str
    channel: str
    payload: Any
    options: dict[str, Any]
    retried: int
    failures: int
    error: str | None
    enqueued_at: float
    failed_at: float | None


@dataclasses.dataclass(slots=True)
class JobContext:
    """What `process(payload, ctx)` learns about the job it runs.

    Args:
        id: the job id.
        channel: the channel as subscribed (without the app prefix).
        retried: earlier deliveries of this job (failures, timeouts, dead workers, stops).
        options: the publish options (`timeout`, `max_retries`, `backoff`, ...).
        signal: set when the job times out, loses its lease or is cancelled by a stop.
    """

    id: str
    channel: str
    retried: int
    options: dict[str, Any]
    signal: asyncio.Event


ProcessFunc = Callable[[Any, JobContext], Awaitable[Any]]
IdleFunc = Callable[[], bool | Awaitable[bool]]


def check_options(
    channel: str,
    timeout: float,
    max_retries: int,
    delay: float,
    backoff: float,
    backoff_max: float,
    max_recoveries: int,
) -> dict[str, Any]:
    """Validate the publish options; returns them as the job stores them."""
    numbers = {"timeout": timeout, "delay": delay, "backoff": backoff, "backoff_max": backoff_max}
    for key, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise QueueError(f"queue {channel}: {key} must be a number of seconds, got {value!r}")
    for key, count in {"max_retries": max_retries, "max_recoveries": max_recoveries}.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise QueueError(f"queue {channel}: {key} must be an integer ≥ 0, got {count!r}")
    if delay < 0 or backoff < 0 or backoff_max < 0:
        raise QueueError(f"queue {channel}: delay, backoff and backoff_max must be ≥ 0")
    return {
        "timeout": timeout,
        "max_retries": max_retries,
        "backoff": backoff,
        "backoff_max": backoff_max,
        "max_recoveries": max_recoveries,
    }


def dead_letter(job: Job, channel: str) -> DeadLetter:
    try:
        data = decode(job.body)
        payload, options = data.get("payload"), data.get("options", {})
    except (AccordError, AttributeError):
        payload, options = None, {}
    return DeadLetter(
        id=job.id,
        channel=channel,
        payload=payload,
        options=options,
        retried=job.attempt,
        failures=job.failures,
        error=job.error,
        enqueued_at=job.enqueued_at,
        failed_at=job.failed_at,
    )


def new_job_id(channel: str, job_id: str | None) -> str:
    """`job_id` checked, or a new random id."""
    if job_id is None:
        return uuid.uuid4().hex
    if not isinstance(job_id, str) or not job_id:
        raise QueueError(f"queue {channel}: job_id must be a non-empty string, got {job_id!r}")
    return job_id


def check_subscription(channel: str, process: Any, concurrency: Any, interval: Any) -> None:
    """Validate the arguments of `subscribe`."""
    if not callable(process):
        raise QueueError(f"queue {channel}: process must be an async callable, got {process!r}")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int):
        raise QueueError(f"queue {channel}: concurrency must be an integer, got {concurrency!r}")
    if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
        raise QueueError(f"queue {channel}: interval must be positive, got {interval!r}")
