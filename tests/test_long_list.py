"""A list of any length stalls no one: long lists on a real uvicorn.

- 150,000 tasks for one user, listed by one client while others ask for `/health` and another
  user's list: the others answer within 100 ms at the 99th percentile, the server grows by
  less than 50 MB, and the owner gets the whole list in order (figures printed with -s);
- a client that stops reading holds no database connection, and the server stops reading
  the list until it reads again (write backpressure);
- the database failing mid-stream aborts the connection: the client never sees a clean end
  of a cut list, with the server's abort extension and without it.
"""

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from backend.features.list import router as list_router
from backend.main import create_app
from backend.platform.config import Settings
from backend.platform.server.abort import ResponseAborted
from backend.platform.server.protocol import HeaderLimitedProtocol
from tests.live_server import free_port, serve
from tests.service_processes import ROOT, SECRET, service_env, wait_healthy
from tests.tcp_proxy import TcpProxy
from tests.test_faults import _upstream_of

LONG_LIST = 150_000
LATENCY_P99_MS = 100
RSS_GROWTH_MB = 50


def insert_tasks(engine: Engine, user_id: str, count: int, *, description: int = 900) -> None:
    """`count` tasks of about 1 KB each (as an attacker would make them: long titles and
    descriptions), a millisecond apart, some a microsecond apart, straight into the table;
    in batches that each stay well within the statement timeout on a busy machine."""
    with engine.begin() as connection:
        for first in range(1, count + 1, 20_000):
            connection.execute(
                text(
                    "INSERT INTO tasks (user_id, title, description, completed, created_at) "
                    "SELECT :user_id, 'Task ' || i || repeat(' t', 40), "
                    "repeat('d', :description), i % 3 = 0, "
                    "now() - i * interval '1 millisecond' - (i % 7) * interval '1 us' "
                    "FROM generate_series(:first, :last) AS i"
                ),
                {
                    "user_id": user_id,
                    "first": first,
                    "last": min(first + 19_999, count),
                    "description": description,
                },
            )
        connection.execute(text("ANALYZE tasks"))


def ids_in_list_order(engine: Engine, user_id: str) -> list[int]:
    with engine.connect() as connection:
        return list(
            connection.execute(
                text(
                    "SELECT id FROM tasks WHERE user_id = :user_id "
                    "ORDER BY created_at DESC, id DESC"
                ),
                {"user_id": user_id},
            ).scalars()
        )


_TASK_ID = re.compile(rb'\{"id":(\d+),')


class IdsOfStream:
    """The task ids in a JSON array read piece by piece (each object starts with its id)."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.size = 0
        self.first = self.last = b""
        self._tail = b""

    def feed(self, data: bytes) -> None:
        if not self.first:
            self.first = data[:1]
        self.size += len(data)
        self.last = data[-1:]
        text_ = self._tail + data
        cut = text_.rfind(b"{")  # an object whose start may not have arrived whole
        if cut < 0:
            self._tail = text_
            return
        self.ids.extend(int(m) for m in _TASK_ID.findall(text_, 0, cut))
        self._tail = text_[cut:]

    def end(self) -> None:
        self.ids.extend(int(m) for m in _TASK_ID.findall(self._tail))
        self._tail = b""


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]


@contextmanager
def uvicorn_process(database_url: str, log: Path, **settings: str) -> Iterator[tuple[int, int]]:
    """`uvicorn backend.main:app` as deployed, its log in a file (a pipe nobody reads would
    fill and stop it); yields (pid, port)."""
    port = free_port()
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "backend.main:app", "--port", str(port)],
            cwd=ROOT,
            env=service_env(database_url, **settings),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_healthy(process, port, timeout=30)  # type: ignore[arg-type]
        yield process.pid, port
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Probe:
    """Asks for `urls` in turn in a thread of its own, timing each answer, until stopped."""

    def __init__(self, urls: list[tuple[str, dict[str, str]]]) -> None:
        self.urls = urls
        self.latencies: dict[str, list[float]] = {url: [] for url, _ in urls}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Probe":
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                for url, headers in self.urls:
                    started = time.perf_counter()
                    response = client.get(url, headers=headers)
                    elapsed = (time.perf_counter() - started) * 1000
                    if response.status_code != 200:
                        self.failures.append(f"{url}: {response.status_code}")
                    self.latencies[url].append(elapsed)
                    time.sleep(0.005)


class RssSampler:
    """The peak resident memory of a process, sampled every few milliseconds in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.005)


def test_a_150000_task_list_streams_whole_and_stalls_no_one(
    database_url: str,
    engine: Engine,
    committed_users: Callable[..., list[str]],
    make_token: Callable[..., str],
    tmp_path: Path,
) -> None:
    owner, other = committed_users(2, "long")
    started = time.perf_counter()
    insert_tasks(engine, owner, LONG_LIST)
    insert_tasks(engine, other, 20, description=100)
    inserted = time.perf_counter() - started
    expected = ids_in_list_order(engine, owner)

    def auth(user_id: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {make_token(user_id, secret=SECRET)}"}

    log = tmp_path / "service.log"
    with uvicorn_process(database_url, log) as (pid, port):
        base = f"http://127.0.0.1:{port}"
        owners_list = f"{base}/api/{owner}/tasks"
        others = [(f"{base}/health", {}), (f"{base}/api/{other}/tasks", auth(other))]
        # Warm: the code paths, the pool's connections, a first 304 of the long list.
        with httpx.Client(timeout=30) as client:
            for _ in range(20):
                for url, headers in others:
                    assert client.get(url, headers=headers).status_code == 200
            # Its headers only: the client hangs up, and the server stops reading the list.
            with client.stream("GET", owners_list, headers=auth(owner)) as response:
                etag = response.headers["ETag"]
            assert (
                client.get(owners_list, headers={**auth(owner), "If-None-Match": etag}).status_code
                == 304
            )
        time.sleep(0.5)
        before = rss_mb(pid)

        ids = IdsOfStream()
        with RssSampler(pid) as rss, Probe(others) as probe:
            time.sleep(0.3)  # the probes' own pace before the list starts
            streaming = time.perf_counter()
            with httpx.Client(timeout=60) as client:
                with client.stream("GET", owners_list, headers=auth(owner)) as response:
                    assert response.status_code == 200
                    assert response.headers["transfer-encoding"] == "chunked"
                    assert response.headers["ETag"] == etag
                    for data in response.iter_raw():
                        ids.feed(data)
            streamed = time.perf_counter() - streaming
            ids.end()
            time.sleep(0.3)

    assert ids.first == b"[" and ids.last == b"]"
    assert ids.ids == expected, "not the whole list in order"
    assert not probe.failures, probe.failures[:5]
    health = probe.latencies[others[0][0]]
    other_list = probe.latencies[others[1][0]]
    growth = rss.peak - before
    request_lines = [
        json.loads(line)
        for line in log.read_text().splitlines()
        if line.startswith("{") and '"event": "request"' in line and f"/api/{owner}/" in line
    ]
    streamed_line = request_lines[-1]
    chunk_rows = os.environ.get("LIST_CHUNK_ROWS", Settings.model_fields["LIST_CHUNK_ROWS"].default)
    figures = (
        f"\nlong list: {LONG_LIST} tasks, {ids.size / 1e6:.0f} MB of JSON in {streamed:.2f} s "
        f"({ids.size / 1e6 / streamed:.0f} MB/s; inserted in {inserted:.1f} s), "
        f"chunks of {chunk_rows}"
        f"\n/health meanwhile: {len(health)} requests, p50 {statistics.median(health):.1f} ms, "
        f"p99 {p99(health):.1f} ms, max {max(health):.1f} ms"
        f"\nanother user's list (20 tasks): {len(other_list)} requests, "
        f"p50 {statistics.median(other_list):.1f} ms, p99 {p99(other_list):.1f} ms, "
        f"max {max(other_list):.1f} ms"
        f"\nserver RSS: {before:.1f} MB before, peak {rss.peak:.1f} MB, growth {growth:.1f} MB"
        f"\nrequest log line: status {streamed_line['status']}, "
        f"duration {streamed_line['duration_ms']:.0f} ms"
    )
    print(figures)
    assert p99(health) < LATENCY_P99_MS, figures
    assert p99(other_list) < LATENCY_P99_MS, figures
    assert growth < RSS_GROWTH_MB, figures
    # The request's log line covers the whole stream, not just its start.
    assert streamed_line["status"] == 200
    assert streamed_line["duration_ms"] >= streamed * 1000 * 0.8, figures


# --- a client that stops reading ---------------------------------------------------------------


def raw_get(port: int, path: str, headers: dict[str, str]) -> socket.socket:
    """A GET on a socket whose receive buffer is small, so that not reading is felt at once."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    lines = [f"GET {path} HTTP/1.1", "Host: test", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def read_all(sock: socket.socket) -> tuple[bytes, Exception | None]:
    """Everything until the server closes (or resets) the connection."""
    received = bytearray()
    try:
        while data := sock.recv(65536):
            received += data
    except OSError as exc:
        return bytes(received), exc
    return bytes(received), None


def dechunk(response: bytes) -> tuple[bytes, bool]:
    """The body of a chunked HTTP/1.1 response, and whether its end (the 0-size chunk) came."""
    _head, _, rest = response.partition(b"\r\n\r\n")
    body = bytearray()
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            return bytes(body), False
        size = int(size_line, 16)
        if size == 0:
            return bytes(body), True
        if len(rest) < size + 2:
            return bytes(body + rest[:size]), False
        body += rest[:size]
        rest = rest[size + 2 :]
    return bytes(body), False


def chunk_statements(engine: Engine) -> list[int]:
    """A counter of the list's chunk statements run on `engine`."""
    count = [0]

    @event.listens_for(engine, "before_cursor_execute")
    def _count(*args: Any) -> None:
        if "ORDER BY tasks.created_at DESC" in args[2]:
            count[0] += 1

    return count


# 300 chunks of about 55 KB: 16 MB, several times what the kernel's socket buffers on both
# sides take in before the server's writes have to wait (about 2.5 MB here).
MANY_TASKS, ROWS = 15_000, 50


@pytest.fixture
def list_server(
    settings: Settings, engine: Engine, committed_user: str, make_token: Callable[..., str]
) -> Iterator[tuple[Any, int, list[int], Callable[[], socket.socket]]]:
    """(app, its port, the count of chunk statements, open a GET of the long list): lists in
    chunks of ROWS, and a pool of one connection."""
    insert_tasks(engine, committed_user, MANY_TASKS)
    app = create_app(settings.model_copy(update={"LIST_CHUNK_ROWS": ROWS, "DB_POOL_SIZE": 1}))
    statements = chunk_statements(app.state.engine)
    headers = {"Authorization": f"Bearer {make_token(committed_user)}"}
    with serve(app) as base:
        port = int(base.rsplit(":", 1)[1])
        yield app, port, statements, lambda: raw_get(port, f"/api/{committed_user}/tasks", headers)


def test_a_client_that_stops_reading_holds_no_connection_and_stops_the_reading(
    list_server: tuple[Any, int, list[int], Callable[[], socket.socket]],
) -> None:
    app, port, statements, open_list = list_server
    with open_list() as sock:
        first = sock.recv(1024)
        assert first.startswith(b"HTTP/1.1 200")
        time.sleep(0.5)  # the server fills what the network holds, then waits in send
        stalled_at = statements[0]
        # Its only connection is free: other requests are answered meanwhile.
        for _ in range(5):
            started = time.perf_counter()
            assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            assert time.perf_counter() - started < 1
        assert app.state.database.usage()[0] == 0, "a session is held by the stalled list"
        time.sleep(1.0)
        assert statements[0] == stalled_at, "the list was read on with nobody reading it"
        assert stalled_at < MANY_TASKS // ROWS // 3, stalled_at
        received, error = read_all(sock)
    assert error is None
    body, ended = dechunk(first + received)
    assert ended
    assert len(json.loads(body)) == MANY_TASKS
    print(
        f"\nslow reader: {stalled_at} of {MANY_TASKS // ROWS + 1} chunk statements, then it waited"
    )


def test_a_client_that_hangs_up_stops_the_reading(
    list_server: tuple[Any, int, list[int], Callable[[], socket.socket]],
) -> None:
    _app, _port, statements, open_list = list_server
    with open_list() as sock:
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        time.sleep(0.3)
    time.sleep(0.5)
    after_hang_up = statements[0]
    time.sleep(0.5)
    assert statements[0] == after_hang_up
    assert after_hang_up < MANY_TASKS // ROWS // 3, "the list was read on for nobody"


# --- the database failing mid-stream ----------------------------------------------------------


@pytest.fixture
def service_behind_proxy(
    settings: Settings, direct_database_url: str
) -> Iterator[Callable[..., tuple[str, TcpProxy]]]:
    """service_behind_proxy(**uvicorn_options): the app serving lists in chunks of 20, its
    database behind a proxy the test controls."""
    stack = ExitStack()

    def start(**options: Any) -> tuple[str, TcpProxy]:
        # The embedded server (a Unix socket) or a TCP one, as the fault tests reach it.
        proxy = TcpProxy(_upstream_of(direct_database_url))
        stack.callback(proxy.close)
        url = make_url(direct_database_url).set(host="127.0.0.1", port=proxy.port)
        proxied = url.difference_update_query(["host"]).render_as_string(False)
        service = settings.model_copy(
            update={
                "DATABASE_URL": proxied,
                "DATABASE_URL_UNPOOLED": "",
                "LIST_CHUNK_ROWS": 20,
                "DB_CONNECT_TIMEOUT_SECONDS": 2,
                "DB_STATEMENT_TIMEOUT_MS": 1500,
            }
        )
        base = stack.enter_context(serve(create_app(service), **options))
        stack.callback(proxy.restore)  # first of all: let the service shut down cleanly
        return base, proxy

    with stack:
        yield start


@pytest.mark.parametrize("extension", [True, False], ids=["abort-extension", "plain-uvicorn"])
def test_the_database_failing_mid_stream_aborts_the_connection(
    service_behind_proxy: Callable[..., tuple[str, TcpProxy]],
    engine: Engine,
    committed_user: str,
    make_token: Callable[..., str],
    capsys: pytest.CaptureFixture[str],
    extension: bool,
) -> None:
    # 16 MB of list: far more than the socket buffers take in, so the server is mid-list,
    # waiting in send, when its database goes.
    insert_tasks(engine, committed_user, 15_000)
    # Our protocol (what `python -m backend` serves with) offers the abort; uvicorn's own does not.
    base, proxy = service_behind_proxy(http=HeaderLimitedProtocol if extension else "httptools")
    port = int(base.rsplit(":", 1)[1])
    token = make_token(committed_user)
    sock = raw_get(port, f"/api/{committed_user}/tasks", {"Authorization": f"Bearer {token}"})
    with sock:
        first = sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200"), first[:100]
        time.sleep(0.3)  # the server waits in send, its next chunk not read yet
        proxy.refuse()  # every connection cut, none to be had
        received, _error = read_all(sock)
    body, ended = dechunk(first + received)
    assert not ended, "a cut list ended as if whole"
    assert body.startswith(b"[")
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)
    time.sleep(0.2)
    out = capsys.readouterr().out
    logged = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    unavailable = [line for line in logged if line["event"] == "db.unavailable"]
    assert unavailable and unavailable[0]["level"] == "warning"
    request = [line for line in logged if line["event"] == "request"][-1]
    assert request["status"] == 200 and request["response_aborted"] is True
    assert not [line for line in logged if line["event"] == "request.unhandled_error"]
    if extension:  # nothing for anyone to be paged for: the database's weather
        assert not [line for line in logged if line["level"] in ("error", "critical")]


def test_without_a_server_to_abort_the_connection_the_app_raises(
    api: Any, user: Any, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TestClient offers no abort extension: the failure must reach it, not a cut body."""
    from tests.factories import TaskFactory

    for _ in range(5):
        TaskFactory(user_id=user.id)
    app.state.settings, settings = (
        app.state.settings.model_copy(update={"LIST_CHUNK_ROWS": 2}),
        app.state.settings,
    )
    chunks = [0]
    read_chunk = list_router.TASK_LIST.chunk

    def failing_second_chunk(session: Any, **kwargs: Any) -> Any:
        chunks[0] += 1
        if chunks[0] == 3:  # the first, the first again after the tag, then the next one
            raise OperationalError("SELECT", {}, Exception("server closed the connection"))
        return read_chunk(session, **kwargs)

    import dataclasses

    monkeypatch.setattr(
        list_router,
        "TASK_LIST",
        dataclasses.replace(list_router.TASK_LIST, chunk=failing_second_chunk),
    )
    try:
        with pytest.raises(ResponseAborted):
            api.get("/tasks")
    finally:
        app.state.settings = settings
