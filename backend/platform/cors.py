"""CORS as Starlette's `CORSMiddleware` answers it, without its cost on requests with no `Origin`.

A request without an `Origin` header (a server-side caller, a probe, a load tool) gets from
Starlette's middleware only `Vary: Origin` added to its answer, after a `Headers` object, a
`functools.partial` and a `MutableHeaders` built for it: about 8% of a `get`'s event-loop time
(py-spy). Browsers send `Origin` on cross-origin calls, so those still pay it.
Here such a request gets the same header, added to the raw list; a request with an `Origin`
goes to Starlette's middleware itself, preflights and all.
"""

from typing import Any

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class CrossOriginMiddleware:
    """Starlette's `CORSMiddleware(app, **options)`, with requests that carry no `Origin`
    answered with `Vary: Origin` directly."""

    def __init__(self, app: ASGIApp, /, **options: Any) -> None:
        self.app = app
        self.cors = CORSMiddleware(app, **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, _ in scope["headers"]:
                if name == b"origin":
                    break
            else:
                await self.app(scope, receive, _varying_by_origin(send))
                return
        await self.cors(scope, receive, send)


def _varying_by_origin(send: Send) -> Send:
    async def send_varying(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = vary_by_origin(message.get("headers", ()))
        await send(message)

    return send_varying


def vary_by_origin(headers: Any) -> list[tuple[bytes, bytes]]:
    """The headers with `Origin` added to `Vary`, as Starlette's `MutableHeaders` sets it: the
    values joined into the first `Vary` header's place, or one appended when there is none."""
    varies = [value for name, value in headers if name == b"vary"]
    combined = (b"vary", b", ".join([*varies, b"Origin"]))
    if not varies:
        return [*headers, combined]
    first = next(index for index, (name, _) in enumerate(headers) if name == b"vary")
    return [
        combined if index == first else (name, value)
        for index, (name, value) in enumerate(headers)
        if name != b"vary" or index == first
    ]
