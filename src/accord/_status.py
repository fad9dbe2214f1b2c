"""`accord status`: the instances, queues and locks of one application, seen from outside."""

from __future__ import annotations

import html
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ._registry import scheme_of
from .app import Application
from .cluster import InstanceInfo, membership_url
from .config import Settings, env_name
from .event_queue import QueueStats
from .locks import LockHolder

# Schemes whose state lives in one process: another process (this command) cannot see it.
EMBEDDED = frozenset({"memory", "local", ""})


@dataclass
class ClusterStatus:
    """One reading of the cluster; `observer` is the instance this command ran as."""

    app: str
    observer: str
    instances: list[InstanceInfo] = field(default_factory=list)
    queues: dict[str, QueueStats] = field(default_factory=dict)
    locks: list[LockHolder] = field(default_factory=list)
    #: settings naming an in-process backend, whose state this command cannot see
    embedded: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "observer": self.observer,
            "instances": [asdict(info) for info in self.instances],
            "queues": {channel: asdict(stats) for channel, stats in self.queues.items()},
            "locks": [asdict(holder) for holder in self.locks],
            "embedded": self.embedded,
        }


def embedded_settings(settings: Settings) -> list[str]:
    """The environment variables whose backend is in-process, so invisible to this command."""
    urls = {
        "cluster_url": membership_url(settings),
        "queue_url": settings.resolved_queue_url,
        "lock_url": settings.resolved_lock_url,
    }
    return [env_name(name) for name, url in urls.items() if scheme_of(url) in EMBEDDED]


async def collect(settings: Settings) -> ClusterStatus:
    """Join the cluster as a short-lived instance without plugins and read what it sees."""
    async with Application(settings=settings) as app:
        return await read(app)


async def read(app: Application, *, include_self: bool = False) -> ClusterStatus:
    """What the started `app` sees of its cluster.

    Args:
        app: a started application.
        include_self: list `app`'s own instance too. Default False: it is only
            the `observer` (the short-lived instance of `accord status`).
    """
    embedded = embedded_settings(app.settings)
    status = ClusterStatus(app.name, app.instance_id, embedded=embedded)
    if env_name("cluster_url") not in embedded:
        instances = await app.cluster.instances()
        status.instances = [
            info for info in instances if include_self or info.id != app.instance_id
        ]
    if env_name("queue_url") not in embedded:
        for channel in await app.event_queue.channels():
            status.queues[channel] = await app.event_queue.stats(channel)
    if env_name("lock_url") not in embedded:
        status.locks = await app.lock_manager.holders()
    return status


Table = tuple[str, tuple[str, ...], list[tuple[str, ...]]]


def tables(status: ClusterStatus, now: float) -> list[Table]:
    """(title, header, rows) of the three tables both renderings show, every cell a string."""
    return [
        (
            "instances",
            ("id", "host", "pid", "up", "last beat"),
            [
                (
                    info.id + (" (this one)" if info.id == status.observer else ""),
                    info.host,
                    str(info.pid),
                    _duration(now - info.started_at),
                    f"{max(0.0, now - info.last_beat):.1f} s ago",
                )
                for info in status.instances
            ],
        ),
        (
            "queues",
            ("channel", "queued", "delayed", "running", "dead"),
            [
                (
                    channel,
                    str(stats.queued),
                    str(stats.delayed),
                    str(stats.running),
                    str(stats.dead),
                )
                for channel, stats in status.queues.items()
            ],
        ),
        (
            "locks held",
            ("key", "instance", "token", "expires in"),
            [
                (holder.key, holder.instance_id, str(holder.token), f"{holder.expires_in:.1f} s")
                for holder in status.locks
            ],
        ),
    ]


def render(status: ClusterStatus, *, now: float | None = None) -> str:
    """The status as the terminal tables `accord status` prints."""
    now = time.time() if now is None else now
    lines = [f"application {status.app!r} (read as instance {status.observer})"]
    for variable in status.embedded:
        lines.append(f"  {variable}: in-process backend; another process cannot see its state")
    for table in tables(status, now):
        lines += _section(*table)
    return "\n".join(lines)


def render_html(status: ClusterStatus, *, now: float | None = None, refresh: int = 5) -> str:
    """The status as a self-contained HTML page: the same three tables, every value escaped.

    Args:
        status: what `read` returned.
        now: the time the durations are measured to. Default: now.
        refresh: seconds after which the browser reloads the page. Default 5.
    """
    now = time.time() if now is None else now
    e = html.escape
    title = f"accord: {status.app}"
    notes = "".join(
        f"<p class=note>{e(variable)}: in-process backend; another process cannot see its "
        "state, so it is not read here</p>"
        for variable in status.embedded
    )
    body = "".join(_html_table(*table) for table in tables(status, now))
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="refresh" content="{int(refresh)}">'
        f"<title>{e(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
        ".note{color:#850}</style></head><body>\n"
        f"<h1>{e(title)}</h1>\n<p>read as instance {e(status.observer)}</p>\n"
        f"{notes}\n{body}</body></html>\n"
    )


def _html_table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    e = html.escape
    parts = [f"<h2>{e(title)}: {len(rows)}</h2>\n"]
    if rows:
        parts.append("<table><tr>" + "".join(f"<th>{e(cell)}</th>" for cell in header) + "</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>")
        parts.append("</table>\n")
    return "\n".join(parts)


def _section(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """`title: n` and, when there are rows, an aligned table under it."""
    lines = ["", f"{title}: {len(rows)}"]
    if not rows:
        return lines
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        lines.append(("  " + "  ".join(cells)).rstrip())
    return lines


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"
