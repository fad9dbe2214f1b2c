"""Type aliases shared across accord."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

#: JSON-compatible data: what a message, a job payload or a cached value may be.
JSON: TypeAlias = dict[str, Any] | list[Any] | str | int | float | bool | None

#: A pub/sub handler receives the message that was published.
MessageHandler: TypeAlias = Callable[[Any], Awaitable[None]]

#: A callback run after a transaction commits or rolls back; plain or async.
Callback: TypeAlias = Callable[[], Awaitable[None] | None]

#: An app event handler receives whatever `Application.emit` was given.
EventHandler: TypeAlias = Callable[..., Awaitable[None] | None]
