"""Application lifecycle: hook order, failed starts, state guard, app events."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from accord import Application, AppState, Plugin, PluginError, Settings, StateError


def recorder(calls: list[str]) -> type[Plugin]:
    """Two-plugin fixtures need distinct classes that write into one shared list."""

    def make(plugin_name: str, fail_in: str | None = None) -> type[Plugin]:
        def hook(hook_name: str) -> Any:
            async def method(self: Plugin) -> None:
                calls.append(f"{plugin_name}.{hook_name}")
                if hook_name == fail_in:
                    raise RuntimeError(f"{plugin_name} broke in {hook_name}")

            return method

        namespace: dict[str, Any] = {"name": plugin_name}
        for hook_name in (
            "after_add",
            "before_load",
            "load",
            "install",
            "after_start",
            "before_stop",
            "after_stop",
        ):
            namespace[hook_name] = hook(hook_name)
        return type(f"Plugin_{plugin_name}", (Plugin,), namespace)

    return make  # type: ignore[return-value]


async def test_hooks_run_in_order_on_start_and_stop(settings: Settings) -> None:
    calls: list[str] = []
    make: Any = recorder(calls)
    app = Application(plugins=[make("a"), make("b")], settings=settings)
    for event in ("before_load", "after_load", "before_start", "after_start"):
        app.on(event, lambda event=event: calls.append(f"app:{event}"))
    for event in ("before_stop", "after_stop"):
        app.on(event, lambda event=event: calls.append(f"app:{event}"))

    await app.start()
    assert app.state is AppState.STARTED
    await app.stop()

    assert calls == [
        "a.after_add",
        "b.after_add",
        "a.before_load",
        "b.before_load",
        "app:before_load",
        "a.load",
        "b.load",
        "app:after_load",
        "a.install",
        "b.install",
        "app:before_start",
        "a.after_start",
        "b.after_start",
        "app:after_start",
        "app:before_stop",
        "a.before_stop",
        "b.before_stop",
        "a.after_stop",
        "b.after_stop",
        "app:after_stop",
    ]
    assert app.state is AppState.STOPPED


async def test_install_runs_once_per_database(settings: Settings) -> None:
    calls: list[str] = []
    make: Any = recorder(calls)
    plugin = make("a")
    async with Application(plugins=[plugin], settings=settings):
        pass
    async with Application(plugins=[plugin], settings=settings):
        pass
    assert calls.count("a.install") == 1
    assert calls.count("a.load") == 2


async def test_failure_in_load_rolls_back_the_start(settings: Settings) -> None:
    calls: list[str] = []
    make: Any = recorder(calls)
    app = Application(plugins=[make("a"), make("b", fail_in="load"), make("c")], settings=settings)

    with pytest.raises(PluginError, match="plugin 'b' failed in load") as caught:
        await app.start()

    assert caught.value.plugin == "b"
    assert caught.value.hook == "load"
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert "c.load" not in calls
    # What had loaded is stopped again, in order; nothing after the failure ran.
    assert calls[calls.index("b.load") + 1 :] == [
        "a.before_stop",
        "b.before_stop",
        "a.after_stop",
        "b.after_stop",
    ]
    assert app.state is AppState.STOPPED
    with pytest.raises(StateError):
        app.db.engine  # noqa: B018 - the database was closed by the rollback


async def test_failure_in_after_start_stops_every_plugin(settings: Settings) -> None:
    calls: list[str] = []
    make: Any = recorder(calls)
    app = Application(plugins=[make("a", fail_in="after_start"), make("b")], settings=settings)
    with pytest.raises(PluginError, match="'a' failed in after_start"):
        await app.start()
    assert calls[-4:] == ["a.before_stop", "b.before_stop", "a.after_stop", "b.after_stop"]
    assert app.state is AppState.STOPPED


def test_duplicate_plugin_names_are_rejected(settings: Settings) -> None:
    class One(Plugin):
        name = "same"

    class Two(Plugin):
        name = "same"

    with pytest.raises(PluginError, match="two plugins are named 'same'"):
        Application(plugins=[One, Two], settings=settings)


def test_plugin_without_name_is_rejected(settings: Settings) -> None:
    class Nameless(Plugin):
        pass

    with pytest.raises(PluginError, match="Nameless has no name"):
        Application(plugins=[Nameless], settings=settings)


def test_plugins_given_as_classes_or_instances(settings: Settings) -> None:
    class One(Plugin):
        name = "one"

    class Two(Plugin):
        name = "two"

    two = Two(colour="blue")
    app = Application(plugins=[One, two], settings=settings)
    assert list(app.plugins) == ["one", "two"]
    assert app.plugins["two"] is two
    assert two.app is app and two.options == {"colour": "blue"}
    with pytest.raises(TypeError):
        app.plugins["three"] = two  # type: ignore[index]


async def test_start_twice_warns_and_stop_twice_is_a_no_op(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    app = Application(settings=settings)
    await app.start()
    with caplog.at_level(logging.WARNING, logger="accord.app"):
        await app.start()
    assert "already started" in caplog.text
    await app.stop()
    await app.stop()
    assert app.state is AppState.STOPPED


async def test_a_stopped_application_cannot_be_used(settings: Settings) -> None:
    app = Application(settings=settings)
    async with app:
        pass
    with pytest.raises(StateError, match="create a new Application"):
        await app.start()
    with pytest.raises(StateError, match="not connected"):
        async with app.db.transaction():
            pass


async def test_stop_before_start_is_a_no_op(settings: Settings) -> None:
    app = Application(settings=settings)
    await app.stop()
    assert app.state is AppState.NEW


def test_name_wins_over_settings(settings: Settings) -> None:
    app = Application(name="other", settings=settings)
    assert app.name == "other" == app.settings.app_name


async def test_instance_ids_are_unique_and_logs_carry_them(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    class Chatty(Plugin):
        name = "chatty"

        async def load(self) -> None:
            self.log.info("loaded")

    first = Application(plugins=[Chatty], settings=settings)
    second = Application(settings=settings)
    assert first.instance_id != second.instance_id
    with caplog.at_level(logging.INFO):
        async with first:
            pass
    assert f"[chatty@{first.instance_id}] loaded" in caplog.text
    assert f"@{first.instance_id}] started" in caplog.text


async def test_app_events_await_async_handlers_and_off_removes(settings: Settings) -> None:
    app = Application(settings=settings)
    seen: list[Any] = []

    async def handler(value: int) -> None:
        seen.append(value)

    app.on("custom", handler)
    await app.emit("custom", 1)
    app.off("custom", handler)
    await app.emit("custom", 2)
    assert seen == [1]


async def test_plugins_share_the_database(settings: Settings, storage: Path) -> None:
    class Writer(Plugin):
        name = "writer"

        async def load(self) -> None:
            async with self.db.transaction() as tx:
                await tx.connection.execute(text("CREATE TABLE t (v INTEGER)"))
                await tx.connection.execute(text("INSERT INTO t VALUES (7)"))

    async with Application(plugins=[Writer], settings=settings):
        pass
    async with Application(settings=settings) as app, app.db.transaction() as tx:
        value = (await tx.connection.execute(text("SELECT v FROM t"))).scalar()
    assert value == 7
    assert (storage / f"{settings.app_name}.sqlite").exists()
