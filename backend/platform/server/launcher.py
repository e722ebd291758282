"""`python -m backend`: uvicorn's own command line, serving `backend.main:app` with our protocol.

uvicorn's `--http` takes only the names of its own protocols, so `uvicorn backend.main:app`
cannot serve with `HeaderLimitedProtocol`. This command takes every other option of uvicorn's
(`--host`, `--port`, `--workers`, `--reload`, `--proxy-headers`, ...; parsed, checked and passed on
by uvicorn's own code) and hands uvicorn the class itself. The class is importable at module
level, so workers and the reloader, which uvicorn starts as fresh processes, find it.
"""

from typing import Any

import click
from uvicorn.main import main as uvicorn_command

from backend.platform.server.protocol import HeaderLimitedProtocol

APP = "backend.main:app"
# The app is always ours, and so is the protocol (HTTP/2 would be served by another).
_FIXED = {"app", "http", "http2"}

# uvicorn's own command: a click.Command (its `main` module is shadowed by this name).
_uvicorn: click.Command = uvicorn_command


def _serve(**options: Any) -> None:
    if any(parameter.name == "http2" for parameter in _uvicorn.params):
        options["http2"] = False
    assert _uvicorn.callback is not None
    _uvicorn.callback(app=APP, http=HeaderLimitedProtocol, **options)


command = click.Command(
    "python -m backend",
    params=[parameter for parameter in _uvicorn.params if parameter.name not in _FIXED],
    callback=_serve,
    context_settings=_uvicorn.context_settings,
    help="Serve the todo API (backend.main:app) with uvicorn, the request header block bounded "
    "(MAX_HEADER_BYTES, MAX_HEADER_FIELDS, HEADER_TIMEOUT_SECONDS, BODY_TIMEOUT_SECONDS). "
    "Options are uvicorn's.",
)


def main(args: list[str] | None = None) -> None:
    command.main(args=args, prog_name="python -m backend")
