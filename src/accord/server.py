"""The HTTP side of an instance: health, status JSON and a status page, as a Starlette app.

Starlette and Uvicorn come with the `server` extra (`pip install 'accord[server]'`);
they are imported when an app or server is built, so this module imports without them.
"""

from __future__ import annotations

import contextlib
import html
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ._registry import require
from ._status import read, render_html
from .app import Application, AppState
from .exceptions import AccordError

if TYPE_CHECKING:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request

__all__ = ["create_asgi_app"]

FEATURE = "the HTTP server (accord serve, accord.server)"


def create_asgi_app(app: Application) -> Starlette:
    """A Starlette (ASGI) app that reports on `app`; mount it in any ASGI server.

    Routes:

    - `GET /health`: 200 `{"status": "ok", "app": ..., "instance_id": ...}` while
      `app` is started, else 503 with `"status"` set to its state.
    - `GET /status`: 200 with the JSON of `accord status --json`, this instance
      included; 503 while `app` is not started or a backend does not answer.
    - `GET /`: the same readings as an HTML page that reloads every 5 s.

    The ASGI app does not start or stop `app`: whoever runs it does (as
    `accord serve` does, or in the lifespan of an enclosing app).

    Args:
        app: the application to report on.

    Example:
        app = Application(plugins=[Greeter])
        asgi = create_asgi_app(app)
        # e.g. Starlette(routes=[Mount("/accord", app=asgi)], lifespan=...)
    """
    require("starlette", feature=FEATURE)
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    def not_started() -> JSONResponse:
        return JSONResponse(_identity(app, app.state.value), status_code=503)

    async def health(request: Request) -> Response:
        if app.state is not AppState.STARTED:
            return not_started()
        return JSONResponse(_identity(app, "ok"))

    async def status(request: Request) -> Response:
        if app.state is not AppState.STARTED:
            return not_started()
        try:
            reading = await read(app, include_self=True)
        except AccordError as exc:
            return JSONResponse({**_identity(app, "error"), "error": str(exc)}, status_code=503)
        return JSONResponse(reading.as_json())

    async def page(request: Request) -> Response:
        if app.state is not AppState.STARTED:
            return HTMLResponse(_plain_page(app, f"application is {app.state.value}"), 503)
        try:
            reading = await read(app, include_self=True)
        except AccordError as exc:
            return HTMLResponse(_plain_page(app, str(exc)), 503)
        return HTMLResponse(render_html(reading))

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/status", status, methods=["GET"]),
            Route("/", page, methods=["GET"]),
        ]
    )


def _identity(app: Application, status: str) -> dict[str, Any]:
    return {"status": status, "app": app.name, "instance_id": app.instance_id}


def _plain_page(app: Application, message: str) -> str:
    return (
        '<!doctype html>\n<html lang=en><head><meta charset=utf-8><meta http-equiv="refresh" '
        f'content="5"><title>accord: {html.escape(app.name)}</title></head><body>'
        f"<p>{html.escape(app.name)} ({html.escape(app.instance_id)}): {html.escape(message)}</p>"
        "</body></html>\n"
    )


def _uvicorn_server(
    app: Application, *, host: str = "127.0.0.1", port: int = 8000
) -> uvicorn.Server:
    """A Uvicorn server for `create_asgi_app(app)` that leaves signal handling to the caller."""
    require("uvicorn", feature=FEATURE)
    import uvicorn

    class Server(uvicorn.Server):
        # `accord serve` handles SIGINT/SIGTERM itself, to stop the application after HTTP.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config = uvicorn.Config(
        create_asgi_app(app),
        host=host,
        port=port,
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=math.ceil(app.settings.stop_grace),
    )
    return Server(config)
