"""The SQL of the PostgreSQL queue adapter: two tables, every state change one statement.

A live job is a row of `accord_jobs`: queued while `lease` is NULL (due once
`due_at` has passed), running while `lease` holds the token of its delivery.
Dead letters are rows of `accord_dead_jobs`. Due times and lease expiry use
the server's clock, so instances with skewed clocks agree.
"""

from __future__ import annotations

import dataclasses

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {jobs} (
    channel text NOT NULL,
    id text NOT NULL,
    seq bigserial NOT NULL,
    body bytea NOT NULL,
    enqueued_at double precision NOT NULL,
    attempt integer NOT NULL,
    failures integer NOT NULL,
    recoveries integer NOT NULL,
    error text,
    due_at timestamptz NOT NULL,
    lease text,
    lease_until timestamptz,
    PRIMARY KEY (channel, id)
);
CREATE INDEX IF NOT EXISTS accord_jobs_due ON {jobs} (channel, due_at, seq) WHERE lease IS NULL;
CREATE INDEX IF NOT EXISTS accord_jobs_leased ON {jobs} (channel, lease_until)
    WHERE lease IS NOT NULL;
CREATE TABLE IF NOT EXISTS {dead} (
    channel text NOT NULL,
    id text NOT NULL,
    seq bigserial NOT NULL,
    body bytea NOT NULL,
    enqueued_at double precision NOT NULL,
    attempt integer NOT NULL,
    failures integer NOT NULL,
    recoveries integer NOT NULL,
    error text,
    failed_at double precision NOT NULL,
    PRIMARY KEY (channel, id)
);
CREATE INDEX IF NOT EXISTS accord_dead_jobs_order ON {dead} (channel, seq);
CREATE INDEX IF NOT EXISTS accord_dead_jobs_id ON {dead} (id);
"""

_COLUMNS = "id, body, enqueued_at, attempt, failures, recoveries, error"

# $1 channel, $2 id, $3 body, $4 enqueued_at, $5 attempt, $6 failures,
# $7 recoveries, $8 error, $9 delay (s), $10 notify channel. One row if added.
_ENQUEUE = """
WITH added AS (
    INSERT INTO {jobs} (channel, id, body, enqueued_at, attempt, failures, recoveries, error, due_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, clock_timestamp() + make_interval(secs => $9))
    ON CONFLICT (channel, id) DO NOTHING
    RETURNING channel
)
SELECT pg_notify($10, md5(channel)) FROM added
"""

# $1 channel, $2 count, $3 consumer, $4 lease (s). SKIP LOCKED lets claimers
# on every instance take different rows without waiting for each other.
_CLAIM = """
WITH next AS (
    SELECT channel, id FROM {jobs}
     WHERE channel = $1 AND lease IS NULL AND due_at <= clock_timestamp()
     ORDER BY due_at, seq
     LIMIT $2
     FOR UPDATE SKIP LOCKED
)
UPDATE {jobs} AS j
   SET lease = $3 || '/' || gen_random_uuid()::text,
       lease_until = clock_timestamp() + make_interval(secs => $4)
  FROM next
 WHERE j.channel = next.channel AND j.id = next.id
RETURNING j.{columns_j}, j.lease, j.due_at, j.seq
"""

# $1 channel. Seconds until the next queued job is due (≤ 0: one is due), or NULL.
_NEXT_DUE = """
SELECT extract(epoch FROM min(due_at) - clock_timestamp())::float8
  FROM {jobs} WHERE channel = $1 AND lease IS NULL
"""

# $1 channels, $2 ids, $3 leases: one array element per job.
_ACK = """
DELETE FROM {jobs} AS j
 USING unnest($1::text[], $2::text[], $3::text[]) AS a(channel, id, lease)
 WHERE j.channel = a.channel AND j.id = a.id AND j.lease = a.lease
RETURNING j.channel, j.id, j.lease
"""

# $1 channels, $2 ids, $3 leases, $4 lease (s).
_RENEW = """
UPDATE {jobs} AS j SET lease_until = clock_timestamp() + make_interval(secs => $4)
  FROM unnest($1::text[], $2::text[], $3::text[]) AS a(channel, id, lease)
 WHERE j.channel = a.channel AND j.id = a.id AND j.lease = a.lease
RETURNING j.channel, j.id, j.lease
"""

# $1 channel, $2 id, $3 lease, $4 attempt, $5 failures, $6 recoveries, $7 error,
# $8 delay (s; NULL: before every job already due), $9 notify channel.
_PUT_BACK = """
WITH back AS (
    UPDATE {jobs}
       SET lease = NULL, lease_until = NULL, attempt = $4, failures = $5, recoveries = $6,
           error = $7,
           due_at = coalesce(clock_timestamp() + make_interval(secs => $8), 'epoch')
     WHERE channel = $1 AND id = $2 AND lease = $3
    RETURNING channel
)
SELECT pg_notify($9, md5(channel)) FROM back
"""

# $1 channel, $2 id, $3 lease, $4 attempt, $5 failures, $6 recoveries, $7 error.
# A dead letter with the same id is replaced and becomes the newest.
_BURY = """
WITH gone AS (
    DELETE FROM {jobs} WHERE channel = $1 AND id = $2 AND lease = $3
    RETURNING channel, id, body, enqueued_at
)
INSERT INTO {dead} AS d
       (channel, id, body, enqueued_at, attempt, failures, recoveries, error, failed_at)
SELECT channel, id, body, enqueued_at, $4, $5, $6, $7, extract(epoch FROM clock_timestamp())
  FROM gone
ON CONFLICT (channel, id) DO UPDATE
   SET seq = excluded.seq, body = excluded.body, enqueued_at = excluded.enqueued_at,
       attempt = excluded.attempt, failures = excluded.failures,
       recoveries = excluded.recoveries, error = excluded.error, failed_at = excluded.failed_at
RETURNING 1
"""

# $1 channel, $2 notify channel, $3 batch. Rows locked by an ack or a renewal
# in progress are skipped; the next pass sees them.
_RECOVER = """
WITH expired AS (
    SELECT channel, id FROM {jobs}
     WHERE channel = $1 AND lease IS NOT NULL AND lease_until <= clock_timestamp()
     LIMIT $3
     FOR UPDATE SKIP LOCKED
), back AS (
    UPDATE {jobs} AS j
       SET lease = NULL, lease_until = NULL, attempt = j.attempt + 1,
           recoveries = j.recoveries + 1, due_at = clock_timestamp()
      FROM expired
     WHERE j.channel = expired.channel AND j.id = expired.id
    RETURNING 1
)
SELECT n, CASE WHEN n > 0 THEN pg_notify($2, md5($1)) END
  FROM (SELECT count(*) AS n FROM back) AS counted
"""

# $1 channel, $2 limit.
_DEAD_LETTERS = """
SELECT {columns}, failed_at FROM {dead} WHERE channel = $1 ORDER BY seq LIMIT $2
"""

# $1 id.
_DEAD_CHANNEL = "SELECT channel FROM {dead} WHERE id = $1 ORDER BY seq LIMIT 1"

# $1 channel, $2 id.
_UNBURY = """
DELETE FROM {dead} WHERE channel = $1 AND id = $2 RETURNING {columns}
"""

# $1 channel, $2 id, $3 body, $4 enqueued_at, $5 attempt, $6 notify channel.
# Run in one transaction with _UNBURY: a conflict rolls both back.
_REQUEUE = """
WITH added AS (
    INSERT INTO {jobs} (channel, id, body, enqueued_at, attempt, failures, recoveries, error, due_at)
    VALUES ($1, $2, $3, $4, $5, 0, 0, NULL, clock_timestamp())
    ON CONFLICT (channel, id) DO NOTHING
    RETURNING channel
)
SELECT pg_notify($6, md5(channel)) FROM added
"""

_PURGE = "DELETE FROM {dead} WHERE channel = $1"

_STATS = """
SELECT count(*) FILTER (WHERE lease IS NULL AND due_at <= clock_timestamp()) AS queued,
       count(*) FILTER (WHERE lease IS NULL AND due_at > clock_timestamp()) AS delayed,
       count(*) FILTER (WHERE lease IS NOT NULL) AS running,
       (SELECT count(*) FROM {dead} WHERE channel = $1) AS dead
  FROM {jobs} WHERE channel = $1
"""

# $1 prefix. Channels with live jobs or dead letters, each once (UNION removes duplicates).
_CHANNELS = """
SELECT channel FROM {jobs} WHERE starts_with(channel, $1)
UNION
SELECT channel FROM {dead} WHERE starts_with(channel, $1)
"""

# Compared between the queue's connection and an application transaction's:
# the same server process, database and table mean the same rows.
IDENTITY = "SELECT current_database(), pg_postmaster_start_time(), to_regclass($1)::oid"


def quote(identifier: str) -> str:
    """`identifier` as a quoted SQL identifier."""
    return '"' + identifier.replace('"', '""') + '"'


@dataclasses.dataclass(frozen=True, slots=True)
class Queries:
    """Every statement, with the tables qualified by the schema they were created in."""

    jobs: str
    schema: str
    enqueue: str
    claim: str
    next_due: str
    ack: str
    renew: str
    put_back: str
    bury: str
    recover: str
    dead_letters: str
    dead_channel: str
    unbury: str
    requeue: str
    purge: str
    stats: str
    channels: str

    @classmethod
    def for_schema(cls, schema: str) -> Queries:
        names = {
            "jobs": f"{quote(schema)}.accord_jobs",
            "dead": f"{quote(schema)}.accord_dead_jobs",
            "columns": _COLUMNS,
            "columns_j": _COLUMNS.replace(", ", ", j."),
        }
        return cls(
            jobs=names["jobs"],
            schema=_SCHEMA.format(**names),
            enqueue=_ENQUEUE.format(**names),
            claim=_CLAIM.format(**names),
            next_due=_NEXT_DUE.format(**names),
            ack=_ACK.format(**names),
            renew=_RENEW.format(**names),
            put_back=_PUT_BACK.format(**names),
            bury=_BURY.format(**names),
            recover=_RECOVER.format(**names),
            dead_letters=_DEAD_LETTERS.format(**names),
            dead_channel=_DEAD_CHANNEL.format(**names),
            unbury=_UNBURY.format(**names),
            requeue=_REQUEUE.format(**names),
            purge=_PURGE.format(**names),
            stats=_STATS.format(**names),
            channels=_CHANNELS.format(**names),
        )
