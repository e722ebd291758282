"""A list of any length as one JSON array, sent a chunk at a time: bounded memory, no
connection held while the client reads, the event loop free between chunks.

A slice describes how its list is read (`KeysetList`) and answers with
`keyset_list_response`. A list that fits in one chunk is answered as any small body is: one
statement, `Content-Length`, a weak `ETag` digest of the body. A longer one is streamed with
chunked transfer encoding: each chunk is its own statement through `Database.run` (so each
carries the per-statement timeout, works through a transaction-mode pooler, and gives its
connection back before the chunk is sent), encoded, and sent before the next is fetched.
The server's `send` waits while the client is not reading (uvicorn's write flow control), so
a slow reader holds a chunk in memory and no connection. Keyset pagination, not OFFSET: each
chunk starts where the last one ended, a range scan of the list's index however deep in the
list it is.

Why by hand: a list of 150,000 tasks answered in one piece built ~200 MB of JSON on the event
loop, held `/health` for 3.4-4.6 s, grew the server by 1.1 GB, and hit the statement timeout
when eight were asked for at once. Streamed in chunks of 500, the same list (175 MB) took
3.2 s, `/health` and another user's list kept a p99 of 24-37 ms meanwhile, and the server grew
by 2 MB; eight at once all came whole, the server growing by 22 MB
(`tests/test_long_list.py`).
Starlette's `StreamingResponse` streams an iterator but knows nothing of aborting a response
that can no longer be completed, which is the part that matters here.
"""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import structlog
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from backend.platform.conditional import weak_etag, weak_etag_of
from backend.platform.errors import database_unavailable
from backend.platform.server.abort import ABORT_EXTENSION, ResponseAborted
from backend.platform.telemetry.metrics import count_db_unavailable

log = structlog.get_logger("backend.streaming")
Item = TypeVar("Item")
T = TypeVar("T")


class Runner(Protocol):
    """`Database.run`, what the chunks are read with."""

    async def run(self, handler: Callable[..., T], /, **kwargs: Any) -> T: ...


@dataclass(frozen=True, slots=True)
class KeysetList(Generic[Item]):
    """How a slice's list is read a chunk at a time, in the order of an index.

    - `chunk(session, *, after, limit, **params)`: at most `limit` items in list order, those
      after `after` (None: from the start). One statement, `... AND (k1, k2) < (:a1, :a2)
      ORDER BY k1 DESC, k2 DESC LIMIT :limit` on an index of (k1 DESC, k2 DESC).
    - `key(item)`: the `after` of the next chunk when `item` was the last one sent: its sort
      key's values as read from the row (a timestamp as the datetime, with its microseconds,
      not as its JSON text, which need not round-trip).
    - `tag(session, **params)`: an opaque string that changes with every write to any item of
      the list, and only then (letters, digits, `-` and `.`). The weak `ETag` of a streamed
      list: one cheap aggregate query rather than a digest of a body nobody holds whole.
    - `encode(items)`: the items as a JSON array, `[...]`.
    """

    chunk: Callable[..., list[Item]]
    key: Callable[[Item], Any]
    tag: Callable[..., str]
    encode: Callable[[list[Item]], bytes]


async def keyset_list_response(
    database: Runner, listing: KeysetList[Any], *, chunk_rows: int, **params: Any
) -> Response:
    """The whole list, as a JSON array: in one piece if it fits in a chunk, else streamed.

    Before the first byte of a streamed list goes out its `ETag` is known (so `If-None-Match`
    can still be a 304). The tag is taken before any row of the body is read. Writes while the
    list streams may or may not show in the body (each chunk is a statement of its own, not a
    snapshot), but any such write also changes the current tag, so the tag the client holds is
    stale: its next `If-None-Match` gets a full answer, never a 304 for a body that misses a
    write. That is why the chunk read to learn the list's length is not reused: it was read
    before the tag, and a write between the two would be in the tag and not in the body.
    """
    first = await database.run(listing.chunk, after=None, limit=chunk_rows + 1, **params)
    if len(first) <= chunk_rows:
        body = listing.encode(first)
        return Response(body, headers={"ETag": weak_etag_of(body)}, media_type="application/json")
    etag = weak_etag(await database.run(listing.tag, **params))
    return ChunkedJSONArray(database, listing, chunk_rows=chunk_rows, params=params, etag=etag)


class ChunkedJSONArray(Response):
    """A list's JSON array streamed chunk by chunk (see the module's docstring).

    If a chunk cannot be read (the database went away, a statement timed out) after the
    headers went out, the response can no longer be a 503, and ending the body cleanly would
    hand the client a cut list as if whole. So the connection is aborted: through the
    server's `ABORT_EXTENSION` when it offers one, else by raising `ResponseAborted` out of
    the app, which makes the server drop the connection without the chunked body's end.
    """

    media_type = "application/json"

    def __init__(
        self,
        database: Runner,
        listing: KeysetList[Any],
        *,
        chunk_rows: int,
        params: dict[str, Any],
        etag: str,
    ) -> None:
        super().__init__(headers={"ETag": etag}, media_type=self.media_type)
        # No Content-Length: the server sends the body with chunked transfer encoding.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.database = database
        self.listing = listing
        self.chunk_rows = chunk_rows
        self.params = params

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        # The server's `send` returns at once, sending nothing, once the client has gone; only
        # `receive` says so. Without watching it, a client that hangs up would still have the
        # whole list read for nobody.
        gone = asyncio.Event()
        watcher = asyncio.create_task(_until_disconnected(receive, gone))
        try:
            await self._send_chunks(scope, send, gone)
        finally:
            watcher.cancel()

    async def _send_chunks(self, scope: Scope, send: Send, gone: asyncio.Event) -> None:
        listing, rows = self.listing, self.chunk_rows
        after: Any = None
        opening = b"["  # before the first item, then a comma before each chunk's first
        while True:
            if gone.is_set():
                return  # nobody to send the rest to
            try:
                items = await self.database.run(
                    listing.chunk, after=after, limit=rows, **self.params
                )
                if items:
                    array = listing.encode(items)
                    after = listing.key(items[-1])
            except Exception as exc:  # noqa: BLE001 - whatever it is, the body cannot be whole
                self._abort(scope, exc)
                return
            if items:
                # The chunk's array without its brackets: the chunks joined are byte for byte
                # the array of the whole list.
                await send(
                    {"type": "http.response.body", "body": opening + array[1:-1], "more_body": True}
                )
                opening = b","
            if len(items) < rows:
                break
        # Rows deleted after the list was found long may leave nothing to send: still an array.
        await send({"type": "http.response.body", "body": b"[]" if opening == b"[" else b"]"})

    def _abort(self, scope: Scope, exc: Exception) -> None:
        if database_unavailable(exc):
            log.warning("db.unavailable", error=type(exc).__name__, path=scope["path"])
            count_db_unavailable()
        else:
            log.error("stream.failed", error=type(exc).__name__, exc_info=exc)
        # On the request's own log line, which the request log middleware writes at the end.
        structlog.contextvars.bind_contextvars(response_aborted=True)
        extension = scope.get("extensions", {}).get(ABORT_EXTENSION)
        if extension is not None:
            extension["abort"]()
            return
        raise ResponseAborted("the list could not be read to its end") from exc


async def _until_disconnected(receive: Receive, gone: asyncio.Event) -> None:
    message: Message = {}
    while message.get("type") != "http.disconnect":
        message = await receive()
    gone.set()
