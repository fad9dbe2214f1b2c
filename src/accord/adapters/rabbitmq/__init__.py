"""RabbitMQ adapters; the driver (aio-pika) is imported here and nowhere else first."""

from __future__ import annotations

from ..._registry import require

require("aio_pika", feature="the RabbitMQ adapters")
