"""The wait callback's socket watch (`backend.platform.db.deadline`): a connection waiting for an
answer on the event loop is registered once, not before every round trip; one with something to
read and nobody waiting stops waking the loop; a descriptor number reused by a new connection
gets that connection its own registration."""

import asyncio
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
import uvloop

from backend.platform.db import deadline
from backend.platform.db.engine import connection_class, statement_limits
from backend.platform.db.greenlet_bridge import run_in_greenlet


class RecordingEpoll:
    """The watch's epoll instance, with the registrations it is asked for written down."""

    def __init__(self, epoll: Any) -> None:
        self.epoll, self.calls, self.polls = epoll, [], 0

    def register(self, fd: int, events: int) -> None:
        self.calls.append(("register", fd))
        self.epoll.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        self.calls.append(("modify", fd))
        self.epoll.modify(fd, events)

    def unregister(self, fd: int) -> None:
        self.calls.append(("unregister", fd))
        self.epoll.unregister(fd)

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        self.polls += 1
        return self.epoll.poll(timeout)

    def fileno(self) -> int:
        return self.epoll.fileno()

    def close(self) -> None:
        self.epoll.close()


@pytest.fixture
def connect(direct_database_url: str):
    psycopg2.extensions.set_wait_callback(deadline.wait_with_deadline)
    factory = connection_class(
        connect_timeout=5,
        network_timeout=3,  # a wait the watch never answers fails in 3 s, not never
        statement_prefix=statement_limits(5000, transactional=False),
    )
    opened = []

    def open_one() -> Any:
        connection = psycopg2.connect(direct_database_url, connection_factory=factory)
        connection.autocommit = True
        opened.append(connection)
        return connection

    yield open_one
    for connection in opened:
        connection.close()


def select_one(connection: Any) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        return cursor.fetchone()[0]  # type: ignore[no-any-return]


async def recording_watch() -> tuple[Any, RecordingEpoll]:
    watch = deadline._watch_for(asyncio.get_running_loop())
    recorder = RecordingEpoll(watch._epoll)
    watch._epoll = recorder
    return watch, recorder


def test_a_connection_is_registered_once_for_all_its_round_trips(connect):
    connection = connect()

    async def scenario() -> RecordingEpoll:
        _, recorder = await recording_watch()
        for _ in range(5):
            assert await run_in_greenlet(select_one, connection) == 1
        return recorder

    recorder = uvloop.run(scenario())
    assert recorder.calls == [("register", connection.fileno())]


def test_a_hung_up_idle_connection_stops_waking_the_loop(connect):
    connection, admin = connect(), connect()

    async def scenario() -> tuple[Any, RecordingEpoll]:
        watch, recorder = await recording_watch()
        assert await run_in_greenlet(select_one, connection) == 1
        with admin.cursor() as cursor:  # the server ends the idle connection's backend
            cursor.execute("SELECT pg_terminate_backend(%s)", (connection.info.backend_pid,))
        await asyncio.sleep(0.3)
        return watch, recorder

    watch, recorder = uvloop.run(scenario())
    fd = connection.fileno()
    assert ("unregister", fd) in recorder.calls
    assert fd not in watch._watched
    # Woken once or twice for the hang-up, not on every turn of the loop for 0.3 s.
    assert recorder.polls <= 4, recorder.polls


def test_a_reused_descriptor_number_is_registered_for_its_new_connection(connect):
    first = connect()

    async def scenario() -> tuple[int, int]:
        watch, _ = await recording_watch()
        assert await run_in_greenlet(select_one, first) == 1
        fd = first.fileno()
        assert watch._watched[fd][0] is first
        first.close()
        second = connect()  # the lowest free descriptor: the one just closed
        assert await run_in_greenlet(select_one, second) == 1  # answered, not timed out
        assert watch._watched[second.fileno()][0] is second
        return fd, second.fileno()

    closed_fd, reused_fd = uvloop.run(scenario())
    assert reused_fd == closed_fd


def test_the_watch_of_a_closed_loop_is_closed_with_it(connect):
    connection = connect()

    async def scenario() -> Any:
        assert await run_in_greenlet(select_one, connection) == 1
        return deadline._watch_for(asyncio.get_running_loop())

    first = uvloop.run(scenario())
    second = uvloop.run(scenario())  # a new loop: the old one's watch is dropped and closed
    assert first is not second
    assert first._epoll.closed
    assert first not in deadline._watches.values()
    assert not second._epoll.closed
