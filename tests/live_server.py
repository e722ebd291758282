"""An app served by a real uvicorn in a background thread, for tests that need real sockets."""

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from backend.platform.server.protocol import HeaderLimitedProtocol


def free_port() -> int:
    """A port nothing listens on right now, for a server started as a separate process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(
    app: ASGIApp,
    *,
    start_timeout: float = 20,
    http: type[asyncio.Protocol] = HeaderLimitedProtocol,
    **options: Any,
) -> Iterator[str]:
    """Yield the base URL of `app` on a free port (lifespan included); stop it afterwards.

    Served with the protocol `python -m backend` serves with, unless `http` names another;
    other `options` go to `uvicorn.Config`."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_config=None, lifespan="on", http=http, **options
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the service did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
