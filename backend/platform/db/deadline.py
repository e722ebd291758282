"""The wait deadline: psycopg2's wait callback, so that no wait on the database is unbounded."""

import asyncio
import select
import threading
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
        watch = None
        ready: asyncio.Future[bool]
        if state == psycopg2.extensions.POLL_READ and not connecting:
            watch = _watch_for(loop)
            ready = watch.readable(connection, fd)
        else:  # sending a query too large for the socket's buffer, or opening a connection
            ready = loop.create_future()
            if state == psycopg2.extensions.POLL_READ:
                loop.add_reader(fd, _settle, ready, True)
            else:
                loop.add_writer(fd, _settle, ready, True)
        timer = None if deadline is None else loop.call_at(deadline, _settle, ready, False)
        try:
            answered = await_from_greenlet(ready)
        finally:
            if watch is not None:
                watch.done_waiting(fd, ready)
            elif state == psycopg2.extensions.POLL_READ:
                loop.remove_reader(fd)
            else:
                loop.remove_writer(fd)
            if timer is not None:
                timer.cancel()
        if not answered:
            if not connecting:
                _cancel_on_event_loop(loop, connection)
            raise _timed_out(timeout, connecting)


class _SocketWatch:
    """Which of the pool's connections have an answer to read, for one event loop.

    The loop's own `add_reader` costs a round trip about seven system calls under uvloop (libuv
    checks, registers, and on `remove_reader` unregisters the socket, and allocates a handle
    each time), and the loop has to be told before every wait. Here the connections' sockets
    are watched by an epoll instance of our own, which the loop watches as one file descriptor:
    a connection is registered the first time it waits and stays registered, so a round trip
    costs no system call for it, and one `epoll_wait` collects every connection that is ready.

    A registration ends by itself when its socket is closed (the kernel drops it). A socket
    that has something to read while nobody waits for it (the server hung up on an idle
    connection, or sent a notice) is unregistered at once, so that it does not wake the loop
    on every turn; its next wait registers it again. Another connection that is given the same
    descriptor number later is told apart by identity and registered afresh.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._epoll = select.epoll()
        self._watched: dict[int, list[Any]] = {}  # fd -> [connection, the future waiting]
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def readable(self, connection: Any, fd: int) -> "asyncio.Future[bool]":
        """A future settled with True when `connection`'s socket `fd` has something to read."""
        entry = self._watched.get(fd)
        if entry is None or entry[0] is not connection:
            if entry is not None:
                self._forget(fd)  # a connection closed since; its descriptor number is reused
            try:
                self._epoll.register(fd, select.EPOLLIN)
            except FileExistsError:
                self._epoll.modify(fd, select.EPOLLIN)
            entry = self._watched[fd] = [connection, None]
        ready: asyncio.Future[bool] = self.loop.create_future()
        entry[1] = ready
        return ready

    def done_waiting(self, fd: int, ready: "asyncio.Future[bool]") -> None:
        entry = self._watched.get(fd)
        if entry is not None and entry[1] is ready:
            entry[1] = None

    def close(self) -> None:
        self._watched.clear()
        self._epoll.close()

    def _dispatch(self) -> None:
        for fd, _events in self._epoll.poll(0):
            entry = self._watched.get(fd)
            ready = None if entry is None else entry[1]
            if ready is None:
                self._forget(fd)  # nobody waits: not woken for it again until its next wait
            elif not ready.done():
                ready.set_result(True)
            # else: answered already, and its greenlet has not read the answer yet

    def _forget(self, fd: int) -> None:
        self._watched.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass  # closed meanwhile, and so no longer registered


_watches: dict[int, _SocketWatch] = {}  # by id(loop); each holds its loop, so ids stay unique
_watches_lock = threading.Lock()


def _watch_for(loop: asyncio.AbstractEventLoop) -> _SocketWatch:
    watch = _watches.get(id(loop))
    if watch is not None and watch.loop is loop:
        return watch
    with _watches_lock:  # loops of other threads (tests) come and go; a closed one's is dropped
        for key, other in list(_watches.items()):
            if other.loop.is_closed():
                other.close()
                del _watches[key]
        watch = _watches[id(loop)] = _SocketWatch(loop)
    return watch


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
