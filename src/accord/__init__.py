"""accord: an asyncio application core whose plugins stay correct when the application runs as a cluster."""

from __future__ import annotations

from .app import Application, AppState
from .config import Settings
from .db import Database, Transaction
from .exceptions import (
    AccordError,
    AdapterError,
    AdapterUnavailable,
    CacheError,
    CacheNotFound,
    ConfigError,
    JobNotFound,
    LockAcquireError,
    LockError,
    LockLostError,
    MissingDependency,
    PluginError,
    QueueError,
    SerializationError,
    StateError,
)
from .plugin import Plugin

__version__ = "0.1.0"

__all__ = [
    "AccordError",
    "AdapterError",
    "AdapterUnavailable",
    "AppState",
    "Application",
    "CacheError",
    "CacheNotFound",
    "ConfigError",
    "Database",
    "JobNotFound",
    "LockAcquireError",
    "LockError",
    "LockLostError",
    "MissingDependency",
    "Plugin",
    "PluginError",
    "QueueError",
    "SerializationError",
    "Settings",
    "StateError",
    "Transaction",
    "__version__",
]
