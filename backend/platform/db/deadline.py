"""The wait deadline: psycopg2's wait callback, so that no wait on the database is unbounded."""

import asyncio
import select
import time
from typing import Any

import psycopg2
import psycopg2.extensions

from backend.platform.db.cancel import send_cancel
from backend.platform.db.greenlet_bridge import await_from_greenlet, in_greenlet


def wait_with_deadline(connection: Any) -> None:
    """psycopg2's wait callback: wait for the socket as libpq would, but never forever.

    A dropped or refused connection fails by itself, and the server's statement_timeout ends a
    slow query; but when the network goes silent (a stalled proxy, a half-open connection, a
    black-holed route) libpq would wait on the socket indefinitely, and the request and its pool
    connection with it. Keepalives and tcp_user_timeout cannot see that case when something in
    between still acknowledges the bytes. So every wait gets a deadline; past it psycopg2 closes
    the connection, and the error reaches the client as a 503. First, though, what the
    connection was running is cancelled (`send_cancel`, waited for at most the connect
    timeout): closing our end alone would leave the statement running on the server, or queued
    in a pooler, to be applied after the 503 was sent. The cost is a poll() and two
    conn.poll() calls in Python per round trip: about 5 us of CPU (see the README).
    libpq ignores connect_timeout in this mode, so the deadline enforces it too.
    """
    connecting = connection.status == psycopg2.extensions.STATUS_SETUP
    timeout = getattr(connection, "connect_timeout" if connecting else "network_timeout", None)
    if in_greenlet():
        _wait_on_event_loop(connection, connecting, timeout)
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    poller, registered = select.poll(), -1
    while True:
        state = connection.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        fd = connection.fileno()  # may change while connecting (one socket per address tried)
        if fd != registered:
            poller, registered = select.poll(), fd
        poller.register(
            fd, select.POLLIN if state == psycopg2.extensions.POLL_READ else select.POLLOUT
        )
        remaining_ms = None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
        if not poller.poll(remaining_ms):
            if not connecting:
                send_cancel(connection).wait(_cancel_bound(connection))
            raise _timed_out(timeout, connecting)


def _wait_on_event_loop(connection: Any, connecting: bool, timeout: float | None) -> None:
    """The wait callback's path inside `Database.run`: the greenlet yields to the event loop
    until the socket is ready, so other requests run meanwhile; same deadline as in a thread."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        state = connection.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        fd = connection.fileno()
        ready: asyncio.Future[bool] = loop.create_future()
        if state == psycopg2.extensions.POLL_READ:
            loop.add_reader(fd, _settle, ready, True)
            remove = loop.remove_reader
        else:
            loop.add_writer(fd, _settle, ready, True)
            remove = loop.remove_writer
        timer = None if deadline is None else loop.call_at(deadline, _settle, ready, False)
        try:
            answered = await_from_greenlet(ready)
        finally:
            remove(fd)
            if timer is not None:
                timer.cancel()
        if not answered:
            if not connecting:
                _cancel_on_event_loop(loop, connection)
            raise _timed_out(timeout, connecting)


def _cancel_on_event_loop(loop: asyncio.AbstractEventLoop, connection: Any) -> None:
    """Cancel the statement, waiting on the event loop (other requests run) at most as long as
    opening a connection may take."""
    cancelled: asyncio.Future[bool] = loop.create_future()

    def settle_from_thread() -> None:
        try:
            loop.call_soon_threadsafe(_settle, cancelled, True)
        except RuntimeError:
            pass  # the loop has closed meanwhile: nobody waits any more

    send_cancel(connection, then=settle_from_thread)
    timer = loop.call_later(_cancel_bound(connection), _settle, cancelled, False)
    try:
        await_from_greenlet(cancelled)
    finally:
        timer.cancel()


def _cancel_bound(connection: Any) -> float:
    """How long a cancel request may take to be delivered before the service answers anyway:
    as long as opening a connection may (the request is sent on a new one)."""
    return float(getattr(connection, "connect_timeout", None) or 5)


def _timed_out(timeout: float | None, connecting: bool) -> psycopg2.OperationalError:
    what = "connecting to" if connecting else "an answer from"
    return psycopg2.OperationalError(f"timed out after {timeout} s waiting for {what} the database")


def _settle(future: "asyncio.Future[bool]", value: bool) -> None:
    if not future.done():
        future.set_result(value)


def socket_has_data(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))
