"""The RabbitMQ queue adapter's names, queue arguments, delay routing and message format.

Per channel: a quorum work queue `accord.job.<channel>`, a classic dead-letter
queue `<work>.dead`, and (once a delayed job is published) 32 classic delay
queues `<work>.delay.NN` holding messages for 2**NN milliseconds each.

Delays need no broker plugin. A delayed message is published to the topic
exchange `accord.delay.31` with a routing key made of the delay's 32 bits,
highest first, then the work queue's name. The exchange of level k hands a
message whose bit k is 1 to the channel's level-k queue and passes the others
to level k-1; a level-k queue expires every message after exactly 2**k ms
into the exchange of level k-1, with the routing key unchanged. Level 0 ends
at `accord.delay.deliver`, bound to each work queue by its name. Every
message of one delay queue has the same TTL, so expiry in queue order is
exact, and the delays of one message add up to its own.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
from typing import Any

from pamqp import commands as spec

from ...event_queue import Job
from ...exceptions import QueueError

PREFIX = "accord.job."
LEVELS = 32
#: The longest delay one trip through the delay queues gives (about 49.7 days).
MAX_DELAY_MS = 2**LEVELS - 1
DELIVER_EXCHANGE = "accord.delay.deliver"
#: Room left in a queue name for the prefix and suffixes, and in a routing key for the bits.
MAX_BASE = 150
ERROR_LIMIT = 2000
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_:-")


def level_exchange(level: int) -> str:
    return DELIVER_EXCHANGE if level < 0 else f"accord.delay.{level:02d}"


FIRST_EXCHANGE = level_exchange(LEVELS - 1)


def _base(channel: str) -> str:
    # Dots separate routing-key words, and `*` and `#` are wildcards: escape all but a safe set,
    # with `+` (itself escaped), which AMQP allows in a queue name.
    escaped = "".join(
        c if c in _SAFE else "".join(f"+{b:02x}" for b in c.encode()) for c in channel
    )
    if len(escaped) <= MAX_BASE:
        return escaped
    return escaped[:100] + "+" + hashlib.blake2b(channel.encode(), digest_size=16).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class Names:
    """Every server-side name of one channel, built in one place."""

    channel: str
    work: str
    dead: str

    def level(self, level: int) -> str:
        return f"{self.work}.delay.{level:02d}"

    def marker(self, job_id: str) -> str:
        return f"{self.work}.id.{hashlib.blake2b(job_id.encode(), digest_size=16).hexdigest()}"

    def delay_key(self, delay_ms: int) -> str:
        bits = ".".join("1" if delay_ms >> k & 1 else "0" for k in range(LEVELS - 1, -1, -1))
        return f"{bits}.{self.work}"

    def level_pattern(self, level: int) -> str:
        words = ["*"] * LEVELS
        words[LEVELS - 1 - level] = "1"
        return ".".join(words) + "." + self.work

    def deliver_pattern(self) -> str:
        return "*." * LEVELS + self.work


@functools.lru_cache(maxsize=1024)
def names_of(channel: str) -> Names:
    work = PREFIX + _base(channel)
    return Names(channel=channel, work=work, dead=work + ".dead")


def pass_pattern(level: int) -> str:
    """What the exchange of `level` passes down to the next level: bit `level` is 0."""
    return "*." * (LEVELS - 1 - level) + "0.#"


def work_arguments(names: Names, delivery_limit: int) -> dict[str, Any]:
    # At-least-once dead-lettering (no message lost between the two queues)
    # needs reject-publish; no length limit is set, so no publish is refused.
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": names.dead,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def level_arguments(level: int) -> dict[str, Any]:
    return {"x-message-ttl": 2**level, "x-dead-letter-exchange": level_exchange(level - 1)}


def marker_arguments(expires_ms: int) -> dict[str, Any]:
    # One message at most, and a second publish is refused (nack): a test-and-set.
    return {"x-max-length": 1, "x-overflow": "reject-publish", "x-expires": expires_ms}


def is_keyed(job: Job) -> bool:
    """Whether a second publish of this job id must be a no-op (`Job.keyed`).

    Checking costs a marker queue per id, so ids that `EventQueue.publish`
    drew itself (unique by construction) are not checked.
    """
    return job.keyed


def properties(
    job: Job,
    *,
    keyed: bool,
    due_ms: int | None = None,
    failed_at: float | None = None,
) -> spec.Basic.Properties:
    """The message properties that carry a job's id and counters (zero counters are left out)."""
    # Every header costs parsing on each delivery: a fresh job carries one.
    headers: dict[str, Any] = {"t": job.enqueued_at}
    for key, count in (("a", job.attempt), ("f", job.failures), ("r", job.recoveries)):
        if count:
            headers[key] = count
    if job.error:
        headers["e"] = job.error[:ERROR_LIMIT]
    if keyed:
        headers["k"] = True
    if due_ms is not None:
        headers["due"] = due_ms
    if failed_at is not None:
        headers["failed"] = failed_at
    return spec.Basic.Properties(
        delivery_mode=2,
        message_id=job.id,
        headers=headers,
    )


def headers_of(message: Any) -> dict[str, Any]:
    headers: dict[str, Any] = message.header.properties.headers or {}
    return headers


def job_of(channel: str, message: Any, *, lease: str = "", delivery_limit: int = 0) -> Job:
    """The job a delivered message carries; returns by the broker count as recoveries."""
    headers = headers_of(message)
    # A quorum queue counts the returns of a message (its consumer's channel
    # closed without acknowledging it): each is a delivery cut short by a crash.
    returned = int(headers.get("x-delivery-count") or 0)
    error = _text(headers.get("e"))
    failed_at = headers.get("failed")
    if headers.get("x-first-death-reason") == "delivery_limit":
        returned = max(returned, delivery_limit + 1)
        error = f"its worker died or stalled more than {delivery_limit} times (RabbitMQ's limit)"
        failed_at = _death_time(headers)
    return Job(
        id=_text(message.header.properties.message_id) or "",
        channel=channel,
        body=message.body,
        enqueued_at=float(headers.get("t") or 0.0),
        attempt=int(headers.get("a") or 0) + returned,
        failures=int(headers.get("f") or 0),
        recoveries=int(headers.get("r") or 0) + returned,
        error=error or None,
        lease=lease,
        failed_at=float(failed_at) if failed_at is not None else None,
        keyed=bool(headers.get("k")),
    )


def delivery_tag(message: Any) -> int:
    delivery = message.delivery
    if isinstance(delivery, spec.Basic.Deliver | spec.Basic.GetOk) and delivery.delivery_tag:
        return delivery.delivery_tag
    raise QueueError(f"a message without a delivery tag: {delivery!r}")


def _death_time(headers: dict[str, Any]) -> float | None:
    deaths = headers.get("x-death") or []
    when = deaths[0].get("time") if deaths else None
    return when.timestamp() if isinstance(when, datetime.datetime) else None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
