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
- A body not complete `BODY_TIMEOUT_SECONDS` after the read that ended its headers is answered
  408 (or, when an answer has already gone out ahead of it, its connection is just closed); the
  app's `receive()` then reports the client gone. A timer is armed only when a body spans reads.

Each refusal is one `http.refused` log line: reason, status and the peer's address, never a
header. The common request (a read that begins it and holds its headers, within the allowance)
is fed to the parser whole when the read ends with the block's end (a GET), else as the block and
then the rest (a POST and its body); it costs a few attribute reads and three short calls more
than uvicorn's (`scripts/header_limit_cost.py --instructions`: about 4,000 instructions a GET,
3% of uvicorn's protocol alone, and 12,000 a POST, 9%). No timer is armed unless the headers
span reads.

`ABORT_EXTENSION` in each request's scope lets the app abort the connection mid-response, so
that a client sees a cut connection rather than a clean end of a response that is incomplete.
One callable per connection serves all its requests: it marks the request being answered
disconnected (uvicorn answers a connection's requests one at a time, in order) and aborts the
transport.
"""

import asyncio
import json
import weakref
from collections import deque
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

# uvicorn's methods that ours extend, called as functions: a little quicker than through super().
_feed_parser = HttpToolsProtocol.data_received
_headers_complete = HttpToolsProtocol.on_headers_complete
_message_complete = HttpToolsProtocol.on_message_complete


class HeaderLimitedProtocol(HttpToolsProtocol):
    """uvicorn's `HttpToolsProtocol`, refusing header blocks over the limits (module docstring).

    `limits` (a class attribute) fixes the limits, for tests; left None, each process reads them
    once from the environment, so that workers spawned by `--workers` get them too.
    """

    limits: ClassVar[HeaderLimits | None] = None

    # Slots, not the instance's dict: uvicorn's own attributes are 28, and CPython 3.11 keeps an
    # instance's attributes in the fast, key-sharing layout its attribute reads are specialised
    # for only up to 30 of them. Eleven more in the dict slowed every `self.` read of uvicorn's
    # per-request code (about 4,600 instructions a GET, more than all our overrides together).
    __slots__ = (
        "_max_header_bytes",
        "_max_header_fields",
        "_header_timeout",
        "_reading_headers",
        "_ended_scope",
        "_header_bytes",
        "_header_timer",
        "_block_timed",
        "_body_timeout",
        "_body_timer",
        "_refused",
        "_abort_extension",
        "_behind",
    )

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
        self._body_timeout = limits.BODY_TIMEOUT_SECONDS
        # Between requests or inside a header block (not inside a body).
        self._reading_headers = True
        # The scope of the last request that ended: a request is in progress while uvicorn's
        # current scope is another (it makes one per request in on_message_begin). A piece fed
        # held the end of a request when this changed while it was fed.
        self._ended_scope: object = None
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._block_timed = False
        self._body_timer: asyncio.TimerHandle | None = None
        self._refused = False
        # The abort extension, one per connection (`_Abort`), and for each request waiting in
        # uvicorn's pipeline the one parsed before it, in the pipeline's order (see _abort).
        self._abort_extension: dict[object, object] = {}
        self._behind: deque[RequestResponseCycle] = deque()

    # --- the connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._abort_extension = {"abort": _Abort(self)}
        self._header_timer = self.loop.call_later(self._header_timeout, self._deadline_passed)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._received(data)
        if not self._reading_headers and self._body_timer is None and not self._refused:
            # A body still to come after this read: from now on it has until the deadline.
            if not self.transport.is_closing() and not self.parser.should_upgrade():
                self._body_timer = self.loop.call_later(
                    self._body_timeout, self._body_deadline_passed
                )

    def _received(self, data: bytes) -> None:
        # The common cases first, in as few steps as they take: a request begins with this read,
        # which is within the allowance. Each is fed as the loop in _feed would feed it.
        if (
            self._header_bytes == 0
            and self._reading_headers
            and not self._refused
            and len(data) <= self._max_header_bytes
        ):
            ended = self._ended_scope
            if data.endswith(b"\r\n\r\n"):
                # Ends with the end of a header block (a GET): fed whole, it has the effect of
                # the loop's pieces, each block within the allowance as the read is. Nothing can
                # be left half-read, so it leaves nothing to count unless it was no request.
                _feed_parser(self, data)
                if ended is self._ended_scope and self._reading_headers and not self._refused:
                    self._count_header_bytes(len(data), False)
                return
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                # A header block and more (a POST and its body): the block, then, when the
                # request has a body, the rest as its first piece (within the allowance, so one).
                stop = end + 4
                view = memoryview(data)
                _feed_parser(self, view[:stop])  # type: ignore[arg-type]
                if (
                    self._reading_headers
                    or self._refused
                    or self.transport.is_closing()
                    or self.parser.should_upgrade()
                ):
                    self._fed(stop, ended)  # not a body that follows: the loop goes on
                    self._feed(data, stop)
                    return
                _feed_parser(self, view[stop:])  # type: ignore[arg-type]
                if ended is not self._ended_scope is self.scope or not self._reading_headers:
                    return  # the request ended and none began, or more of its body is to come
                if not self._refused:
                    self._count_header_bytes(len(data) - stop, ended is not self._ended_scope)
                return
        self._feed(data)

    def _feed(self, data: bytes, start: int = 0) -> None:
        """Feeds `data` from `start` to uvicorn's parser in pieces: a header block no further than
        what is left of its allowance (and no further than its end), a body in pieces no larger
        than the limit; after each, counts what the header block in progress has taken."""
        if self._refused:
            return  # answered and closing: nothing more reaches the parser
        size = len(data)
        if start and (start == size or self.transport.is_closing() or self.parser.should_upgrade()):
            return  # as the loop below stops after a piece
        limit = self._max_header_bytes
        while True:
            if self._reading_headers:
                allowance = limit - self._header_bytes
                if allowance <= 0:
                    self._refuse_oversized_block()
                    return
                stop = start + allowance if allowance < size - start else size
                # Only up to the end of the block when it is in view, so that a pipelined
                # request after it starts a piece of its own and is counted exactly.
                end = data.find(b"\r\n\r\n", start, stop)
                if end >= 0:
                    stop = end + 4
            else:
                stop = (
                    start + limit if limit < size - start else size
                )  # a body, in pieces no larger
            ended = self._ended_scope
            if start == 0 and stop == size:
                _feed_parser(self, data)
            else:
                _feed_parser(self, memoryview(data)[start:stop])  # type: ignore[arg-type]
            self._fed(stop - start, ended)
            if stop == size or self._refused or self.transport.is_closing():
                return
            if self.parser.should_upgrade():
                return  # uvicorn handed the connection on (or refused the upgrade) as it does
            start = stop

    def _fed(self, fed: int, ended: object) -> None:
        """After a piece of `fed` bytes, `ended` the last ended scope before it: counts them."""
        if self._reading_headers and not self._refused:
            if ended is self._ended_scope or self.scope is not self._ended_scope:
                # Not the common case of one request, done, none begun.
                self._count_header_bytes(fed, ended is not self._ended_scope)

    # --- parser callbacks ----------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        if self._header_timer is not None:
            self._cancel_header_timer()
        previous = self.cycle
        if len(self.headers) > self._max_header_fields:
            # Answered through uvicorn's own response path, in turn after any pipelined
            # request before it, by an app that refuses instead of the service's.
            app, self.app = self.app, self._answer_too_many_fields
            try:
                _headers_complete(self)
            finally:
                self.app = app
        else:
            _headers_complete(self)
        scope = self.scope
        cycle = self.cycle
        if cycle is not None and cycle.scope is scope:
            if self.pipeline:
                self._queued_behind(previous)
            if "extensions" in scope:
                scope["extensions"][ABORT_EXTENSION] = self._abort_extension
            else:
                scope["extensions"] = {ABORT_EXTENSION: self._abort_extension}

    def on_message_complete(self) -> None:
        _message_complete(self)
        if self._body_timer is not None:
            self._cancel_body_timer()
        self._ended_scope = self.scope
        self._reading_headers = True
        self._header_bytes = 0

    # --- aborting a response -------------------------------------------------------------------

    def _queued_behind(self, previous: RequestResponseCycle) -> None:
        """uvicorn queued the request just parsed behind `previous`, whose app runs or waits."""
        behind = self._behind
        while len(behind) >= len(self.pipeline):
            behind.pop()  # entries of requests uvicorn has since taken out of its pipeline
        behind.appendleft(previous)

    def _abort(self) -> None:
        """Marks the request being answered disconnected and aborts the connection.

        The request being answered is the last one whose app uvicorn started: the one before the
        oldest request still in uvicorn's pipeline, or with none waiting, the current one. Only
        its app can be mid-response (uvicorn starts the next once a response is complete).
        """
        pipeline = self.pipeline
        cycle = self._behind[len(pipeline) - 1] if pipeline else self.cycle
        if cycle is not None:
            # uvicorn then neither writes more nor logs an unfinished response as an error.
            cycle.disconnected = True
        self.transport.abort()

    # --- the limits ----------------------------------------------------------------------------

    def _count_header_bytes(self, fed: int, message_ended: bool) -> None:
        in_message = self.scope is not self._ended_scope
        if message_ended:
            # The piece held the end of a request; only what came after it is the new block's.
            self._header_bytes = self._delivered_bytes() if in_message else 0
        else:
            self._header_bytes += fed
        if not self._header_bytes:
            return
        if in_message and len(self.headers) > self._max_header_fields:
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
        in_message = self.scope is not self._ended_scope
        if in_message and len(self.url) + _REQUEST_LINE_OVERHEAD >= self._header_bytes:
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

    def _body_deadline_passed(self) -> None:
        """The body of the request being read is not complete `_body_timeout` after the read
        that ended its headers: answered 408 unless an answer has gone out or may be going out
        ahead of it (the app answered without waiting for the body, or an earlier pipelined
        request is being answered), then the connection is closed. The app's `receive()` then
        tells it the client is gone, and nothing it sends is written."""
        self._body_timer = None
        if self._reading_headers or self._refused or self.transport.is_closing():
            return
        self._refused = True
        cycle = self.cycle
        answered = cycle is None or cycle.response_started or bool(self.pipeline)
        if cycle is not None:
            cycle.disconnected = True
        if answered:
            log.warning("http.refused", reason="body_timeout", client=self._peer())
        else:
            log.warning("http.refused", reason="body_timeout", status=408, client=self._peer())
            detail = f"The request's body took longer than {self._body_timeout:g} s."
            self.transport.write(_json_response(408, detail, self.server_state.default_headers))
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

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _peer(self) -> str | None:
        return f"{self.client[0]}:{self.client[1]}" if self.client else None


class _Abort:
    """The abort extension's callable, made once per connection and offered in each of its
    requests' scopes. It holds its protocol weakly: the protocol holds this, and a reference cycle
    would leave each connection's objects to the garbage collector instead of freeing them when
    it is done. Nothing it holds refers to a request, so no request's objects form a cycle with it
    either (a scope holds this)."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: HeaderLimitedProtocol) -> None:
        self._protocol = weakref.ref(protocol)

    def __call__(self) -> None:
        protocol = self._protocol()
        if protocol is not None:  # else the connection is long gone
            protocol._abort()


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
