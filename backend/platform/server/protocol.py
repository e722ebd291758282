"""uvicorn's httptools protocol with a bounded request header block, a header deadline, and a
way for the app to cut a connection mid-response.

uvicorn (through 0.54) puts no limit on the header block: httptools joins each header's
fragments by concatenation, so one 100 MB header held the event loop for 12.4 s, five unfinished
50 MB blocks held 245 MB, 100,000 header lines were accepted, and a client trickling its headers
held its connection forever. Here:

- At most `MAX_HEADER_BYTES` of a request line and headers reach the parser: while a header block
  is being read, only what is left of that allowance is fed (and no further than the block's
  end when it is in view), and a block still unfinished when it is spent is answered 431 (400
  when the request line alone took it) and the connection closed. A read that ends the headers
  and carries a body is not refused for its size: once the headers are complete the rest goes
  to the parser as usual. The count restarts with each request, exactly when the request
  begins a piece fed to the parser, as every request after headers alone does. A pipelined
  request that begins inside a piece of the previous request's body is counted from what the
  parser has delivered of it (its target and whole header lines), so its block may pass the
  limit by the rest of that piece, itself at most `MAX_HEADER_BYTES` (bodies are fed in pieces
  no larger).
- More than `MAX_HEADER_FIELDS` fields is 431.
- A header block not complete `HEADER_TIMEOUT_SECONDS` after its first byte is answered 408, and a
  new connection that sends nothing for as long is closed (uvicorn's keep-alive timeout only
  starts after a first response).

Each refusal is one `http.refused` log line: reason, status and the peer's address, never a
header. The common request (its headers in one read) costs a search for its blank line and a
few attribute reads more than uvicorn's; no timer is armed unless the headers span reads.

`ABORT_EXTENSION` in each request's scope lets the app abort the connection mid-response, so
that a client sees a cut connection rather than a clean end of a response that is incomplete.
"""

import asyncio
import json
import weakref
from http import HTTPStatus
from typing import Any, ClassVar

import structlog
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from backend.platform.config import HeaderLimits, get_header_limits
from backend.platform.server.abort import ABORT_EXTENSION

# What a request line costs beyond its target ("DELETE " and " HTTP/1.1\r\n" fit in it): a
# refusal whose block is (almost) all target blames the request line.
_REQUEST_LINE_OVERHEAD = 32

log = structlog.get_logger("backend.http")


class HeaderLimitedProtocol(HttpToolsProtocol):
    """uvicorn's `HttpToolsProtocol`, refusing header blocks over the limits (module docstring).

    `limits` (a class attribute) fixes the limits, for tests; left None, each process reads them
    once from the environment, so that workers spawned by `--workers` get them too.
    """

    limits: ClassVar[HeaderLimits | None] = None

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = self.limits or get_header_limits()
        self._max_header_bytes = limits.MAX_HEADER_BYTES
        self._max_header_fields = limits.MAX_HEADER_FIELDS
        self._header_timeout = limits.HEADER_TIMEOUT_SECONDS
        # Between requests or inside a header block (not inside a body).
        self._reading_headers = True
        # The scope of the last request that ended: a request is in progress while uvicorn's
        # current scope is another (it makes one per request in on_message_begin).
        self._ended_scope: object = None
        # Set when a request ended during the piece being fed: the bytes after it are another's.
        self._message_ended = False
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._block_timed = False
        self._refused = False

    # --- the connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self._header_timeout, self._deadline_passed)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered and closing: nothing more reaches the parser
        limit = self._max_header_bytes
        size = len(data)
        start = 0
        while True:
            if self._reading_headers:
                allowance = limit - self._header_bytes
                if allowance <= 0:
                    self._refuse_oversized_block()
                    return
                stop = min(size, start + allowance)
                # Only up to the end of the block when it is in view, so that a pipelined
                # request after it starts a piece of its own and is counted exactly.
                end = data.find(b"\r\n\r\n", start, stop)
                if end >= 0:
                    stop = end + 4
            else:
                stop = min(size, start + limit)  # a body, in pieces no larger
            self._message_ended = False
            if start == 0 and stop == size:
                super().data_received(data)  # the common case: one read, one request
            else:
                super().data_received(memoryview(data)[start:stop])  # type: ignore[arg-type]
            if self._reading_headers and not self._refused:
                if self._message_ended and self.scope is self._ended_scope:
                    self._header_bytes = 0  # the common case: one request, done, none begun
                else:
                    self._count_header_bytes(stop - start)
            if stop == size or self._refused or self.transport.is_closing():
                return
            if self.parser.should_upgrade():
                return  # uvicorn handed the connection on (or refused the upgrade) as it does
            start = stop

    # --- parser callbacks ----------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        if self._header_timer is not None:
            self._cancel_header_timer()
        if len(self.headers) > self._max_header_fields:
            # Answered through uvicorn's own response path, in turn after any pipelined
            # request before it, by an app that refuses instead of the service's.
            app, self.app = self.app, self._answer_too_many_fields
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:
            extensions = self.scope.setdefault("extensions", {})
            extensions[ABORT_EXTENSION] = {"abort": _Abort(cycle, self.transport)}

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._ended_scope = self.scope
        self._reading_headers = True
        self._message_ended = True
        self._header_bytes = 0

    @property
    def _in_message(self) -> bool:
        return self.scope is not self._ended_scope

    # --- the limits ----------------------------------------------------------------------------

    def _count_header_bytes(self, fed: int) -> None:
        if self._message_ended:
            # The piece held the end of a request; only what came after it is the new block's.
            self._header_bytes = self._delivered_bytes() if self._in_message else 0
        else:
            self._header_bytes += fed
        if not self._header_bytes:
            return
        if self._in_message and len(self.headers) > self._max_header_fields:
            self._refuse(
                431, "too_many_fields", f"More than {self._max_header_fields} header fields."
            )
            return
        if not self._block_timed:
            # The headers span reads: from now on they have until the deadline.
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(self._header_timeout, self._deadline_passed)
            self._block_timed = True

    def _delivered_bytes(self) -> int:
        """What the parser has handed over of a request that began inside the last piece."""
        fields = sum(len(name) + len(value) + 4 for name, value in self.headers)
        return _REQUEST_LINE_OVERHEAD + len(self.url) + fields

    def _refuse_oversized_block(self) -> None:
        limit = self._max_header_bytes
        if self._in_message and len(self.url) + _REQUEST_LINE_OVERHEAD >= self._header_bytes:
            self._refuse(400, "request_line_too_long", f"Request line over {limit} bytes.")
        else:
            self._refuse(
                431, "header_block_too_large", f"Request line and headers over {limit} bytes."
            )

    def _deadline_passed(self) -> None:
        self._header_timer = None
        if self._refused or self.transport.is_closing():
            return
        if self._block_timed:
            self._refuse(
                408,
                "header_timeout",
                f"The request's headers took longer than {self._header_timeout:g} s.",
            )
        else:
            # Connected and silent: nothing to answer.
            self._refused = True
            log.warning("http.refused", reason="silent_connection", client=self._peer())
            self.transport.close()

    def _refuse(self, status: int, reason: str, detail: str) -> None:
        """Answer `status` with `{"detail": detail}` and close; nothing more is parsed."""
        self._refused = True
        self._cancel_header_timer()
        log.warning("http.refused", reason=reason, status=status, client=self._peer())
        answer = _json_response(status, detail, self.server_state.default_headers)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # Earlier pipelined requests are still being answered, and nothing may go out
            # ahead of them: this answer follows the response to the last of them.
            self.flow.pause_reading()
            responded = cycle.on_response

            def answer_after_it() -> None:
                responded()
                if not self.transport.is_closing():  # else it asked to close after it
                    self._unset_keepalive_if_required()
                    self.transport.write(answer)
                    self.transport.close()

            cycle.on_response = answer_after_it
            return
        self.transport.write(answer)
        self.transport.close()

    async def _answer_too_many_fields(self, scope: Any, receive: Any, send: Any) -> None:
        status, detail = 431, f"More than {self._max_header_fields} header fields."
        log.warning("http.refused", reason="too_many_fields", status=status, client=self._peer())
        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._block_timed = False

    def _peer(self) -> str | None:
        return f"{self.client[0]}:{self.client[1]}" if self.client else None


class _Abort:
    """The abort extension's callable. It holds its cycle weakly: the cycle holds the scope that
    holds this, and a reference cycle per request would leave each request's objects to the
    garbage collector instead of freeing them when the request is done."""

    __slots__ = ("_cycle", "_transport")

    def __init__(self, cycle: RequestResponseCycle, transport: asyncio.Transport) -> None:
        self._cycle = weakref.ref(cycle)
        self._transport = transport

    def __call__(self) -> None:
        cycle = self._cycle()
        if cycle is not None:
            # uvicorn then neither writes more nor logs an unfinished response as an error.
            cycle.disconnected = True
        self._transport.abort()


def _json_response(status: int, detail: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()]
    head += [name + b": " + value + b"\r\n" for name, value in default_headers]
    head += [
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n\r\n",
    ]
    return b"".join(head) + body
