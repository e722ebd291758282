"""The abort extension of `python -m backend`'s protocol, on a real socket: an app that cuts its
response short is seen by the client as a cut connection, not as a clean end, and uvicorn logs
no error for it."""

import logging
from typing import Any

import httpx
import pytest

from backend.platform.server.abort import ABORT_EXTENSION
from tests.live_server import serve


async def streams_then_aborts(scope: Any, receive: Any, send: Any) -> None:
    """Starts a chunked JSON array, then gives up as a streaming list does when its database
    fails mid-stream."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b'[{"id": 1},', "more_body": True})
    scope["extensions"][ABORT_EXTENSION]["abort"]()


def test_an_aborted_response_is_a_cut_connection_and_no_error_is_logged(caplog):
    with caplog.at_level(logging.ERROR), serve(streams_then_aborts) as url:
        with httpx.Client() as client, client.stream("GET", url) as response:
            assert response.status_code == 200
            received = b""
            with pytest.raises(httpx.RemoteProtocolError):  # incomplete chunked body
                for chunk in response.iter_raw():
                    received += chunk
            assert received == b'[{"id": 1},'
    assert not [r for r in caplog.records if r.name.startswith("uvicorn")], caplog.text
