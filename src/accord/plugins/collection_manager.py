"""Collections: user-defined schema held in memory on every instance, synced after commit.

Every instance keeps the collections (names, ordered typed fields) in a dict,
because they are read on every request. A change is written in a database
transaction; once it commits, the instance that made it reloads the collection
and sends a sync message, and every other instance reloads it from the
database. Adding and removing fields, and dropping a collection, run under a
cluster-wide lock on the collection, so a check and the write that follows it
never interleave with another instance's.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Column,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    and_,
    func,
    select,
)
from sqlalchemy.exc import IntegrityError

from .. import _codec
from ..db import Transaction
from ..exceptions import AccordError, PluginError
from ..plugin import Plugin

__all__ = [
    "FIELD_TYPES",
    "Collection",
    "CollectionNotFound",
    "CollectionsPlugin",
    "DuplicateNameError",
    "Field",
]

FIELD_TYPES = frozenset({"string", "integer", "float", "boolean", "json", "datetime"})
MAX_NAME_LENGTH = 63
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

metadata = MetaData()
# The primary keys are the unique constraints that back the duplicate checks.
collections_table = Table(
    "accord_collections",
    metadata,
    Column("app", String(200), nullable=False),
    Column("name", String(MAX_NAME_LENGTH), nullable=False),
    Column("options", JSON, nullable=False),
    PrimaryKeyConstraint("app", "name", name="accord_collections_pkey"),
)
fields_table = Table(
    "accord_collection_fields",
    metadata,
    Column("app", String(200), nullable=False),
    Column("collection", String(MAX_NAME_LENGTH), nullable=False),
    Column("name", String(MAX_NAME_LENGTH), nullable=False),
    Column("type", String(20), nullable=False),
    Column("options", JSON, nullable=False),
    Column("position", Integer, nullable=False),
    PrimaryKeyConstraint("app", "collection", "name", name="accord_collection_fields_pkey"),
)


class CollectionNotFound(AccordError, KeyError):
    """No collection of that name exists."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(AccordError, ValueError):
    """A collection, or a field of a collection, of that name already exists."""


def check_name(name: object, what: str) -> str:
    """Return `name` if it is a valid collection or field name; raise otherwise.

    Args:
        name: the name to check.
        what: how the error names it, e.g. "field name".
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__}")
    if len(name) > MAX_NAME_LENGTH or not _NAME.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} is not valid: use 1 to {MAX_NAME_LENGTH} ASCII letters, "
            "digits or '_', not starting with a digit"
        )
    return name


def _check_options(options: object, what: str) -> dict[str, Any]:
    if not isinstance(options, Mapping):
        raise TypeError(f"{what} must be a mapping, got {type(options).__name__}")
    _codec.encode(options, what=what)
    return dict(options)


@dataclass(frozen=True)
class Field:
    """One field of a collection.

    Args:
        name: 1 to 63 ASCII letters, digits or '_', not starting with a digit.
        type: one of `FIELD_TYPES`.
        options: JSON-compatible data kept with the field (e.g. `{"required": True}`).
    """

    name: str
    type: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name(self.name, "field name")
        if self.type not in FIELD_TYPES:
            raise ValueError(
                f"field {self.name!r}: unknown type {self.type!r}; "
                f"use one of {', '.join(sorted(FIELD_TYPES))}"
            )
        options = _check_options(self.options, f"options of field {self.name!r}")
        object.__setattr__(self, "options", options)


@dataclass(frozen=True)
class Collection:
    """A user-defined collection: a name and its fields, in order.

    Args:
        name: 1 to 63 ASCII letters, digits or '_', not starting with a digit.
        fields: `Field`s with distinct names, in order.
        options: JSON-compatible data kept with the collection.
    """

    name: str
    fields: tuple[Field, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name(self.name, "collection name")
        fields = tuple(self.fields)
        seen: set[str] = set()
        for item in fields:
            if not isinstance(item, Field):
                raise TypeError(
                    f"collection {self.name!r}: fields must be Field objects, "
                    f"got {type(item).__name__}"
                )
            if item.name in seen:
                raise DuplicateNameError(
                    f"collection {self.name!r} lists two fields named {item.name!r}"
                )
            seen.add(item.name)
        object.__setattr__(self, "fields", fields)
        options = _check_options(self.options, f"options of collection {self.name!r}")
        object.__setattr__(self, "options", options)

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(item.name for item in self.fields)


class CollectionsPlugin(Plugin):
    """User-defined collections, held in memory on every instance and synced after commit.

    Example:
        app = Application(plugins=[CollectionsPlugin])
        async with app:
            plugin = app.plugins["collections"]
            await plugin.create_collection("posts", [Field("title", "string")])
            await plugin.add_field("posts", "views", "integer", default=0)
            plugin.collections["posts"].field_names   # ("title", "views"), on every instance
    """

    name: ClassVar[str] = "collections"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._collections: dict[str, Collection] = {}
        self._view = MappingProxyType(self._collections)
        self._reloading = asyncio.Lock()
        self._loaded = False

    @property
    def collections(self) -> Mapping[str, Collection]:
        """Collection name -> `Collection`, as this instance knows them (read-only, live)."""
        return self._view

    def get(self, name: str) -> Collection | None:
        """The collection named `name`, or None."""
        return self._collections.get(name)

    # Lifecycle. `load` runs before `install`: on the very first start against a
    # database the tables do not exist yet, and the schema is read in `after_start`.

    async def load(self) -> None:
        if await self.db.missing_tables(metadata):
            self.log.debug("tables not created yet; the schema is read after install")
            return
        await self._reload()
        self._loaded = True
        self.log.info("loaded %d collection(s)", len(self._collections))

    async def install(self) -> None:
        await self.db.create_tables(metadata)

    async def after_start(self) -> None:
        if self._loaded:
            return
        missing = await self.db.missing_tables(metadata)
        if missing:
            raise PluginError(
                f"plugin {self.name!r}: the table(s) {', '.join(missing)} are missing although "
                f"the plugin is recorded as installed for application {self.app.name!r}; "
                "delete its row from accord_plugins to create them again at the next start",
                plugin=self.name,
                hook="after_start",
            )
        await self._reload()
        self._loaded = True
        self.log.info("loaded %d collection(s)", len(self._collections))

    async def handle_sync_message(self, message: Any) -> None:
        name = message.get("collection") if isinstance(message, dict) else None
        if not isinstance(name, str):
            self.log.warning("ignored a sync message without a collection name")
            return
        await self._reload(name)
        self.log.debug("collection %s reloaded after a change on another instance", name)

    async def on_resync(self) -> None:
        await self._reload()
        self.log.info("resynced: %d collection(s)", len(self._collections))

    # Changes.

    async def create_collection(
        self,
        name: str,
        fields: Iterable[Field] = (),
        *,
        transaction: Transaction | None = None,
        **options: Any,
    ) -> Collection:
        """Create a collection; every instance sees it once the transaction commits.

        Args:
            name: the collection's name.
            fields: its fields, in order.
            transaction: write in this transaction; the change is applied and
                announced when it commits, and not at all if it rolls back.
                Default: a transaction of its own.
            **options: JSON-compatible data kept with the collection.

        Raises `DuplicateNameError` if a collection of that name exists.
        """
        collection = Collection(name, tuple(fields), options)
        async with self._transaction(transaction) as tx:
            try:
                await tx.connection.execute(
                    collections_table.insert().values(
                        app=self.app.name, name=name, options=collection.options
                    )
                )
                if collection.fields:
                    await tx.connection.execute(
                        fields_table.insert(),
                        [
                            self._field_row(name, item, position)
                            for position, item in enumerate(collection.fields)
                        ],
                    )
            except IntegrityError as exc:
                raise DuplicateNameError(
                    f"collection {name!r} already exists; choose another name or drop it first"
                ) from exc
            await self._changed(tx, name, "created")
        return collection

    async def add_field(
        self,
        collection: str,
        name: str,
        type: str,
        *,
        transaction: Transaction | None = None,
        **options: Any,
    ) -> Field:
        """Append a field to a collection, under the collection's lock.

        Args:
            collection: the collection's name.
            name: the field's name.
            type: one of `FIELD_TYPES`.
            transaction: write in this transaction (the lock covers the check
                and the write; the primary key covers the rest until it commits).
                Default: a transaction of its own, committed before the lock is released.
            **options: JSON-compatible data kept with the field.

        Raises `CollectionNotFound`, or `DuplicateNameError` if the field exists.
        """
        check_name(collection, "collection name")
        new = Field(name, type, options)
        async with self._locked(collection), self._transaction(transaction) as tx:
            await self._require(tx, collection)
            exists = await tx.connection.scalar(
                select(fields_table.c.name).where(self._field_is(collection, name))
            )
            if exists is not None:
                raise DuplicateNameError(
                    f"collection {collection!r} already has a field {name!r}; "
                    "choose another name or remove it first"
                )
            last = await tx.connection.scalar(
                select(func.max(fields_table.c.position)).where(
                    fields_table.c.app == self.app.name, fields_table.c.collection == collection
                )
            )
            try:
                await tx.connection.execute(
                    fields_table.insert().values(
                        self._field_row(collection, new, 0 if last is None else last + 1)
                    )
                )
            except IntegrityError as exc:
                raise DuplicateNameError(
                    f"collection {collection!r} already has a field {name!r}; "
                    "choose another name or remove it first"
                ) from exc
            await self._changed(tx, collection, f"field {name} added")
        return new

    async def remove_field(self, collection: str, name: str) -> bool:
        """Remove a field, under the collection's lock; False if there is no such field.

        Args:
            collection: the collection's name.
            name: the field's name.

        Raises `CollectionNotFound` if the collection does not exist.
        """
        check_name(collection, "collection name")
        check_name(name, "field name")
        async with self._locked(collection), self.db.transaction() as tx:
            await self._require(tx, collection)
            result = await tx.connection.execute(
                fields_table.delete().where(self._field_is(collection, name))
            )
            if result.rowcount == 0:
                self.log.info("collection %s has no field %s; nothing removed", collection, name)
                return False
            await self._changed(tx, collection, f"field {name} removed")
        return True

    async def drop_collection(self, name: str) -> bool:
        """Drop a collection and its fields, under its lock; False if it does not exist.

        Args:
            name: the collection's name.
        """
        check_name(name, "collection name")
        async with self._locked(name), self.db.transaction() as tx:
            await tx.connection.execute(
                fields_table.delete().where(
                    fields_table.c.app == self.app.name, fields_table.c.collection == name
                )
            )
            result = await tx.connection.execute(
                collections_table.delete().where(self._collection_is(name))
            )
            if result.rowcount == 0:
                self.log.info("collection %s does not exist; nothing dropped", name)
                return False
            await self._changed(tx, name, "dropped")
        return True

    # Helpers.

    @asynccontextmanager
    async def _transaction(self, transaction: Transaction | None) -> AsyncIterator[Transaction]:
        if transaction is None:
            async with self.db.transaction() as tx:
                yield tx
        else:
            async with transaction as tx:
                yield tx

    @asynccontextmanager
    async def _locked(self, collection: str) -> AsyncIterator[None]:
        async with self.app.lock_manager.lock(f"collections:{collection}"):
            yield

    async def _changed(self, tx: Transaction, name: str, what: str) -> None:
        """After `tx` commits: reload `name` here and tell the other instances."""

        async def committed() -> None:
            await self._reload(name)
            self.log.info("collection %s %s", name, what)

        await self.send_sync_message({"collection": name}, transaction=tx)
        tx.after_commit(committed)

    async def _require(self, tx: Transaction, name: str) -> None:
        found = await tx.connection.scalar(
            select(collections_table.c.name).where(self._collection_is(name))
        )
        if found is None:
            raise CollectionNotFound(f"no collection named {name!r}; create it first")

    def _collection_is(self, name: str) -> Any:
        return and_(collections_table.c.app == self.app.name, collections_table.c.name == name)

    def _field_is(self, collection: str, name: str) -> Any:
        return and_(
            fields_table.c.app == self.app.name,
            fields_table.c.collection == collection,
            fields_table.c.name == name,
        )

    def _field_row(self, collection: str, item: Field, position: int) -> dict[str, Any]:
        return {
            "app": self.app.name,
            "collection": collection,
            "name": item.name,
            "type": item.type,
            "options": item.options,
            "position": position,
        }

    async def _reload(self, name: str | None = None) -> None:
        """Read one collection (or all) from the database into memory.

        Reloads run one at a time, each reading after the previous one, so a
        slower, older read never overwrites a newer one.
        """
        async with self._reloading:
            found = await self._read(name)
            if name is None:
                self._collections.clear()
            elif name not in found:
                self._collections.pop(name, None)
            self._collections.update(found)

    async def _read(self, name: str | None) -> dict[str, Collection]:
        c, f = collections_table.c, fields_table.c
        # One statement, so the collection and its fields come from one snapshot.
        query = (
            select(c.name, c.options, f.name, f.type, f.options)
            .select_from(
                collections_table.outerjoin(
                    fields_table, and_(f.app == c.app, f.collection == c.name)
                )
            )
            .where(c.app == self.app.name)
            .order_by(c.name, f.position, f.name)
        )
        if name is not None:
            query = query.where(c.name == name)
        async with self.db.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        options: dict[str, dict[str, Any]] = {}
        fields: dict[str, list[Field]] = {}
        for collection, collection_options, field_name, field_type, field_options in rows:
            options.setdefault(collection, collection_options)
            bucket = fields.setdefault(collection, [])
            if field_name is not None:
                bucket.append(Field(field_name, field_type, field_options))
        return {key: Collection(key, tuple(fields[key]), options[key]) for key in options}
