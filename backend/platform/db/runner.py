"""`Database`: runs the slices' blocking handlers on the event loop, one session per connection."""

import asyncio
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog
from fastapi import Request
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from backend.platform.config import Settings
from backend.platform.db.deadline import socket_has_data
from backend.platform.db.greenlet_bridge import run_in_greenlet
from backend.platform.db.statements import DirectSession, Statements

log = structlog.get_logger("backend.db")
T = TypeVar("T")


class Database:
    """Runs the slices' blocking handlers, `handler(session, **kwargs)`, on the event loop.

    Each handler runs in a greenlet (`greenlet_bridge`: the mechanism of SQLAlchemy's asyncio
    layer). psycopg2's wait callback sees that and, instead of blocking, hands control back to the
    event loop until the socket is ready; other requests run meanwhile. So a request costs no
    thread-pool hop and no GIL hand-off, and the handlers stay plain SQLAlchemy `Session` code.

    There are exactly as many sessions as the pool has connections, and a handler runs only
    while it holds one, so a greenlet never waits on the pool's (thread) lock, which would
    stall the whole event loop. A request that finds every session busy waits on the loop for
    up to DB_POOL_TIMEOUT_SECONDS, then gets the pool-timeout 503.

    A handler sends its statements through the session and returns, without committing:
    `Database` ends the unit of work, committing when the handler returns and rolling back
    when it raises (`_commit`, `_call`), so no handler can forget either.

    Sessions are reused, and each keeps its connection checked out between requests: returning
    it to the pool and taking it back (with the session's bookkeeping around both) cost about
    6% of the CPU of a whole request. What the pool's checkout did for each request is done
    here instead (`_session_for`): a connection that an error broke, that the server has hung
    up on while idle, or that is older than DB_POOL_RECYCLE_SECONDS is discarded and replaced.
    A session leaves no state behind for the next request (see `_call`).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        sessions: int,
        checkout_timeout: float,
        recycle_seconds: float = 240,
        prepare: bool = True,
    ) -> None:
        self.engine = engine
        self.statements = Statements(engine.dialect, prepare=prepare)
        self._capacity = sessions
        self._timeout = checkout_timeout
        self._recycle = recycle_seconds
        self._created = 0
        # First in, first out: requests take turns on the connections, so each is used (and a
        # dead one noticed) as often as the others, as the pool handed them out before.
        self._idle: deque[_Slot] = deque()
        self._waiters: deque[asyncio.Future[_Slot]] = deque()
        self._shared = False  # True: the session is the caller's, not per request
        self._first_connection_made = False
        self._first_connection_lock = threading.Lock()

    @classmethod
    def for_engine(cls, engine: Engine, settings: Settings) -> "Database":
        return cls(
            engine,
            sessions=settings.DB_POOL_SIZE + settings.DB_MAX_OVERFLOW,
            checkout_timeout=settings.DB_POOL_TIMEOUT_SECONDS,
            recycle_seconds=settings.DB_POOL_RECYCLE_SECONDS,
            prepare=settings.DB_PREPARED_STATEMENTS,
        )

    @classmethod
    def for_session(cls, session: Session) -> "Database":
        """Always this one session, one request at a time (tests run requests inside it)."""
        database = cls(session.get_bind().engine, sessions=1, checkout_timeout=30)
        slot = _Slot()
        slot.session = session
        database._idle.append(slot)
        database._created = 1
        database._shared = True
        database._first_connection_made = True
        return database

    async def run(self, handler: Callable[..., T], /, **kwargs: Any) -> T:
        if not self._first_connection_made:
            await run_in_threadpool(self._make_first_connection)
        # One turn of the event loop between a request's way in (middlewares, authentication,
        # validation) and its database work, so that under load those do not run as one long
        # step while no socket is read. Measured with 32 clients on one saturated worker,
        # alternating with the same service without it: the event loop's p99 lag went from
        # 15 to 12 ms, list's p99 per round from 34-86 ms to 34-60 ms, create's from 30-70 ms
        # to 31-50 ms, throughput the same or higher; it costs a task step (a few us).
        await asyncio.sleep(0)
        slot = await self._checkout()
        try:
            return await run_in_greenlet(self._call, slot, handler, kwargs)
        finally:
            self._checkin(slot)

    @property
    def pool_name(self) -> str:
        """How the metrics name these sessions' connections: host:port/database, no secret (the
        socket directory for a Unix-socket URL, which names its host in the query)."""
        url = self.engine.url
        host = url.host or url.query.get("host") or ""
        return f"{host}:{url.port or 5432}/{url.database or ''}"

    def usage(self) -> tuple[int, int, int]:
        """Sessions in use, sessions idle, and requests waiting for one (for the metrics; no
        lock needed: the event loop's thread is the only one that changes these)."""
        idle = len(self._idle)
        waiting = sum(1 for waiter in self._waiters if not waiter.done())
        return self._created - idle, idle, waiting

    def close(self) -> None:
        """Hand every idle session's connection back to the pool (at shutdown, before the pool
        is disposed of, which closes only the connections it holds)."""
        for slot in self._idle:
            if not self._shared:
                slot.release()

    def open_connections(self, count: int) -> int:
        """Open `count` sessions' connections now (at start-up, from a thread, before any
        request): otherwise the first burst of requests after a start or a deploy each waits
        for a connection to be opened, a TLS handshake away on Neon. Opened a few at a time.
        A connection that cannot be opened is only logged: it is opened on demand later, as
        without this. Returns how many were opened."""
        count = min(count, self._capacity - self._created)
        if count <= 0:
            return 0
        with ThreadPoolExecutor(max_workers=min(count, 4)) as pool:
            slots = list(pool.map(lambda _: self._opened_slot(), range(count)))
        opened = [slot for slot in slots if slot is not None]
        self._created += len(opened)
        self._idle.extend(opened)
        if opened:
            self._first_connection_made = True
        if len(opened) < count:
            log.warning("db.connections_not_opened_at_start", opened=len(opened), wanted=count)
        return len(opened)

    def _opened_slot(self) -> "_Slot | None":
        slot = _Slot()
        try:
            self._session_for(slot)
        except SQLAlchemyError as exc:
            log.info("db.connection_open_failed", error=type(exc).__name__)
            return None
        return slot

    def _make_first_connection(self) -> None:
        """An engine's first connection runs SQLAlchemy's one-time dialect set-up under a thread
        lock; a second greenlet connecting meanwhile would block the loop on it for good. So
        the first connection is made from a thread (the service's start-up makes it anyway)."""
        with self._first_connection_lock:  # requests arriving together make it only once
            if self._first_connection_made:
                return
            with self.engine.connect():
                pass
            self._first_connection_made = True

    def _call(self, slot: "_Slot", handler: Callable[..., T], kwargs: dict[str, Any]) -> T:
        if self._shared:
            session = slot.session
            assert session is not None
            if session.in_transaction():
                # What the caller wrote before this request stands, as a client's earlier
                # requests would: a failing handler rolls back only its own work.
                session.commit()
        else:
            session = self._session_for(slot)
        try:
            # Statements run on the direct path (`statements`), prepared where they can be.
            result = handler(DirectSession(session, self.statements), **kwargs)
            self._commit(slot, session)
        except BaseException:
            # Whatever the handler did in the session is rolled back, and whatever it loaded is
            # forgotten: the next request (perhaps another user's) starts from an empty
            # session. close() does both and copes with a connection that died; a closed
            # Session is used again as if new, on the same connection.
            if not self._shared:
                session.close()
            elif session.in_transaction():
                session.rollback()  # the caller's session: roll back, keep its objects
            raise
        return result

    def _commit(self, slot: "_Slot", session: Session) -> None:
        """End a handler's unit of work: what it wrote is stored, what it loaded is forgotten.

        On an autocommit connection (the serving engine's) each statement a handler sent was
        committed by PostgreSQL as it returned; the session's transaction is bookkeeping only
        (no BEGIN was sent), so it is left open for the next request on this session rather
        than ended and begun again: that costs about 11% of the CPU of a request (measured with
        callgrind on `get`). Objects a handler added or loaded through the ORM are flushed by
        a commit and then dropped; on a transactional connection, commit is a real COMMIT.
        """
        if self._shared:
            if session.in_transaction():
                session.commit()  # the caller's: a savepoint released, inside its transaction
            return
        if not slot.dbapi_connection.autocommit or session.new or session.identity_map:
            session.commit()
            if session.identity_map:
                session.close()

    def _session_for(self, slot: "_Slot") -> Session:
        """The slot's session on a connection fit for a statement, checked out if need be (in
        the handler's greenlet, so a new connection is opened off the event loop)."""
        if slot.connection is not None:
            unusable = slot.why_unusable()
            if unusable is not None:
                log.info("db.connection_discarded", reason=unusable)
                slot.release(discard=True)
        if slot.connection is None:
            connection = self.engine.connect()
            try:
                opened_at = connection.info.get("opened_at", time.monotonic())
                slot.dbapi_connection = connection.connection.dbapi_connection
            except BaseException:
                connection.close()
                raise
            slot.connection = connection
            slot.session = Session(bind=connection, expire_on_commit=False)
            # Connections opened together (at start-up, or by a burst of requests) are not all
            # replaced at the same moment, which would stall that many requests at once: each
            # lives between 80% and 100% of DB_POOL_RECYCLE_SECONDS.
            slot.expires_at = opened_at + self._recycle * random.uniform(0.8, 1.0)
        assert slot.session is not None
        return slot.session

    async def _checkout(self) -> "_Slot":
        if self._idle:
            return self._idle.popleft()
        if self._created < self._capacity:
            self._created += 1
            return _Slot()
        waiter: asyncio.Future[_Slot] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._timeout):
                return await waiter
        except BaseException as exc:
            # A timeout or a cancellation cancels the waiter too, unless a session was handed
            # to it in the same instant: then it goes to the next in line.
            if waiter.done() and not waiter.cancelled():
                self._checkin(waiter.result())
            if isinstance(exc, TimeoutError):
                raise PoolTimeoutError("every database connection stayed busy") from None
            raise

    def _checkin(self, slot: "_Slot") -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._idle.append(slot)


class _Slot:
    """One of `Database`'s sessions and the connection it keeps between requests."""

    __slots__ = ("session", "connection", "dbapi_connection", "expires_at")

    def __init__(self) -> None:
        self.session: Session | None = None
        self.connection: Connection | None = None
        self.dbapi_connection: Any = None
        self.expires_at = 0.0

    def why_unusable(self) -> str | None:
        """Why the kept connection cannot take the next statement, or None if it can."""
        assert self.connection is not None
        if self.connection.invalidated or self.dbapi_connection.closed:
            return "broken by an earlier error"
        if time.monotonic() >= self.expires_at:
            return "older than DB_POOL_RECYCLE_SECONDS"
        if socket_has_data(self.dbapi_connection.fileno()):
            return "closed by server while idle"
        return None

    def release(self, *, discard: bool = False) -> None:
        """Back to the pool, which closes it first when `discard` is set."""
        connection, session = self.connection, self.session
        self.connection = self.session = self.dbapi_connection = None
        if connection is None:
            return
        try:
            try:
                if discard and not connection.invalidated:
                    connection.invalidate()
                if session is not None:
                    session.close()  # ends the transaction it may have kept open (`_commit`)
            finally:
                connection.close()
        except Exception as exc:  # noqa: BLE001 - a dead connection may fail even to close
            log.info("db.connection_close_failed", error=type(exc).__name__)


def database_of(request: Request) -> Database:
    """The app's `Database` (`app.state.database`; tests put one on their own session there).

    Routes take `request: Request` and call this rather than declaring a `Depends`: FastAPI
    passes the request for free, while each dependency it resolves costs about 5% of the CPU
    of a request (measured on `get`: 1.731 M -> 1.644 M instructions without one).

    A request carrying `Idempotency-Key` or `If-Match` on a route that honours them gets the
    database through its guard (`backend.platform.guarded`), which rewrites the statement."""
    guard = request.scope.get("todo.write_guard")
    if guard is None:
        return request.app.state.database  # type: ignore[no-any-return]
    return guard.around(request.app.state.database)  # type: ignore[no-any-return]
