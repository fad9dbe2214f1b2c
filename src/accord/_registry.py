"""Adapter lookup by URL scheme, with lazy imports and helpful errors."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from .exceptions import ConfigError, MissingDependency

#: The pip extra that provides each driver module.
EXTRAS = {
    "redis": "redis",
    "asyncpg": "postgres",
    "aio_pika": "rabbitmq",
    "starlette": "server",
    "uvicorn": "server",
}


def scheme_of(url: str) -> str:
    """The scheme of `url` (`memory`, `redis`, ...); a bare word such as `local` is its own scheme."""
    if "://" not in url:
        return url.strip().lower()
    return urlsplit(url).scheme.lower()


def load_adapter(table: Mapping[str, str], url: str, *, setting: str) -> Any:
    """Import and return the object registered in `table` for the scheme of `url`.

    Args:
        table: scheme -> "package.module:attribute".
        url: the configured URL.
        setting: the setting's name, quoted in errors (e.g. "ACCORD_QUEUE_URL").
    """
    scheme = scheme_of(url)
    target = table.get(scheme)
    if target is None:
        known = ", ".join(sorted(table))
        raise ConfigError(f"{setting}: unknown scheme {scheme!r}; use one of: {known}")
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except MissingDependency as exc:
        raise MissingDependency(f"{setting}: {exc}") from exc.__cause__
    return getattr(module, attribute)


def require(module: str, *, feature: str) -> Any:
    """Import a driver module, or raise `MissingDependency` naming the pip extra.

    Each adapter package's `__init__` calls this once, so the driver is
    imported in one place.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.partition(".")[0]
        extra = EXTRAS.get(top, top)
        raise MissingDependency(
            f"{feature} needs the {top!r} package, which is not installed; "
            f"run: pip install 'accord[{extra}]'"
        ) from exc
