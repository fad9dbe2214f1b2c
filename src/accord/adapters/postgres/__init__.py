"""PostgreSQL adapters; the driver (asyncpg) is imported here and nowhere else first."""

from __future__ import annotations

from ..._registry import require

require("asyncpg", feature="the PostgreSQL adapters")
