"""The errors accord raises.

The tree, kept true:

* AccordError               base of everything accord raises
  x ConfigError             bad settings; raised at start, never later
    + MissingDependency     an optional extra is not installed; names the pip command
  x PluginError             a plugin is misdeclared, or one of its hooks failed
  x StateError              used before start or after stop
  x AdapterError            the server or its driver failed; the original is on __cause__
    + AdapterUnavailable    cannot connect, or the connection was lost
  x SerializationError      a payload or value that cannot cross the wire as JSON
  x CacheError
    + CacheNotFound         no cache of that name was created
  x LockError
    + LockAcquireError      busy (try_acquire) or not acquired within the timeout
    + LockLostError         the lease was lost while the body ran
  x QueueError
    + JobNotFound           no job with that id
"""

from __future__ import annotations

__all__ = [
    "AccordError",
    "AdapterError",
    "AdapterUnavailable",
    "CacheError",
    "CacheNotFound",
    "ConfigError",
    "JobNotFound",
    "LockAcquireError",
    "LockError",
    "LockLostError",
    "MissingDependency",
    "PluginError",
    "QueueError",
    "SerializationError",
    "StateError",
]


class AccordError(Exception):
    """Base class of every error accord raises."""


class ConfigError(AccordError):
    """A setting is wrong; the message names the setting and the fix."""


class MissingDependency(ConfigError):
    """An optional dependency is missing; the message gives the pip command."""


class PluginError(AccordError):
    """A plugin is misdeclared, or one of its lifecycle hooks failed.

    Args:
        message: what went wrong.
        plugin: the plugin's name, when one plugin is to blame.
        hook: the hook that failed, when a hook failed.
    """

    def __init__(self, message: str, *, plugin: str | None = None, hook: str | None = None):
        super().__init__(message)
        self.plugin = plugin
        self.hook = hook


class StateError(AccordError):
    """An object was used before it was started or after it was stopped."""


class AdapterError(AccordError):
    """The server behind an adapter, or its driver, failed."""


class AdapterUnavailable(AdapterError):
    """The server cannot be reached, or the connection to it was lost."""


class SerializationError(AccordError, TypeError):
    """A value cannot be encoded as JSON-compatible data."""


class CacheError(AccordError):
    """A cache operation failed."""


class CacheNotFound(CacheError, KeyError):
    """No cache of that name exists."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class LockError(AccordError):
    """A lock operation failed."""


class LockAcquireError(LockError):
    """The lock is busy, or was not acquired within the timeout."""


class LockLostError(LockError):
    """The lease expired or was taken while the body was running."""


class QueueError(AccordError):
    """An event queue operation failed."""


class JobNotFound(QueueError, KeyError):
    """No job with that id exists (pending, running or dead)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
