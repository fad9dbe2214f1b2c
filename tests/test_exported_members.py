"""The public API is exactly what `accord.__all__` says, and every name in it exists."""

from __future__ import annotations

import subprocess
import sys

import accord

EXPECTED = {
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
}


def test_all_is_pinned() -> None:
    assert set(accord.__all__) == EXPECTED
    for name in accord.__all__:
        assert hasattr(accord, name), name


def test_public_classes_say_they_live_in_accord() -> None:
    for name in accord.__all__:
        member = getattr(accord, name)
        if isinstance(member, type):
            assert member.__module__.startswith("accord"), name
            assert member.__doc__, f"{name} has no docstring"


def test_importing_accord_loads_no_driver() -> None:
    # `pip install accord` without extras must work: drivers load only when used.
    code = "import sys, accord; print(sorted(m for m in ('redis', 'asyncpg', 'aio_pika') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
