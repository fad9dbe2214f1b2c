"""Publishing a job inside a database transaction: through the outbox, sent once it commits."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ._queue_types import Job
from .exceptions import StateError

if TYPE_CHECKING:
    from .db import Transaction
    from .event_queue import EventQueue

#: The outbox kind of queue jobs.
OUTBOX_KIND = "queue"


def register_outbox(queue: EventQueue) -> None:
    """Let the outbox relay send the queue's rows, including rows a crashed instance left."""

    async def send(row_id: Any, record: dict[str, Any]) -> None:
        await send_record(queue, record)

    queue.app.sync_message_manager.outbox.register(OUTBOX_KIND, send)


async def publish_in_transaction(
    queue: EventQueue, transaction: Transaction, name: str, job_id: str, body: bytes, delay: float
) -> None:
    """Queue a job only if `transaction` commits.

    The record carries the job id, so a row sent twice (a relay that stalled,
    a crash between sending and marking) is enqueued once while it is pending.
    """
    job = Job(id=job_id, channel=name, body=body, enqueued_at=time.time(), keyed=True)
    in_tx = getattr(queue._adapter, "enqueue_in_transaction", None)
    if in_tx is not None and await in_tx(transaction, job, delay) is not None:
        return
    record = {
        "channel": name,
        "job_id": job_id,
        "body": body.decode(),
        "delay": delay,
        "enqueued_at": job.enqueued_at,
    }
    await queue.app.sync_message_manager.outbox.add(transaction, OUTBOX_KIND, record)


async def send_record(queue: EventQueue, record: dict[str, Any]) -> None:
    """Enqueue a job written by `publish_in_transaction`, once its transaction committed."""
    # The relay may run before the queue connects (rows a crashed instance left
    # behind are sent early in start); raising leaves the row for its next sweep.
    if not queue.is_connected():
        raise StateError(f"event queue is {queue.state.value}; the outbox row waits")
    enqueued_at = float(record["enqueued_at"])
    remaining = max(0.0, float(record["delay"]) - max(0.0, time.time() - enqueued_at))
    job = Job(
        id=record["job_id"],
        channel=record["channel"],
        body=record["body"].encode(),
        enqueued_at=enqueued_at,
        keyed=True,
    )
    if not await queue.adapter.enqueue(job, remaining):
        queue.app.log.debug(
            "queue %s: job %s from the outbox was already queued", job.channel, job.id
        )
