"""accord: an asyncio application core whose plugins stay correct when the application runs as a cluster."""

from __future__ import annotations

from .app import Application, AppState
from .cache import MISSING, Cache, CacheManager
from .cluster import Cluster, InstanceInfo
from .config import Settings
from .db import Database, Transaction
from .event_queue import DeadLetter, EventQueue, JobContext, QueueStats
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
from .locks import Lock, LockHolder, LockManager
from .plugin import Plugin
from .pubsub import Envelope, PubSubManager
from .sync_messages import SyncMessageManager

__version__ = "0.1.0"

__all__ = [
    "MISSING",
    "AccordError",
    "AdapterError",
    "AdapterUnavailable",
    "AppState",
    "Application",
    "Cache",
    "CacheError",
    "CacheManager",
    "CacheNotFound",
    "Cluster",
    "ConfigError",
    "Database",
    "DeadLetter",
    "Envelope",
    "EventQueue",
    "InstanceInfo",
    "JobContext",
    "JobNotFound",
    "Lock",
    "LockAcquireError",
    "LockError",
    "LockHolder",
    "LockLostError",
    "LockManager",
    "MissingDependency",
    "Plugin",
    "PluginError",
    "PubSubManager",
    "QueueError",
    "QueueStats",
    "SerializationError",
    "Settings",
    "StateError",
    "SyncMessageManager",
    "Transaction",
    "__version__",
]
