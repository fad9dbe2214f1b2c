"""EventQueue (being built; see the README's feature table)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import Application


class EventQueue:
    def __init__(self, app: Application) -> None:
        self.app = app

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def abort(self) -> None:
        pass

    async def start_consumers(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        raise NotImplementedError(f"EventQueue.{name} is not built yet")
