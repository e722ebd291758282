"""Faults, for real: the live service talks to PostgreSQL through a TCP proxy the test controls.

While a load of creates, edits and toggles runs, the test cuts the network, refuses
connections, stalls it, or kills the service's backends with pg_terminate_backend; then it
compares what every client was told with what the database holds:
- no 500, ever; a failure is a 503 `{"detail": ...}` with Retry-After, answered within bounds;
- every 201/200 a client saw is in the database;
- a failed request left nothing behind, with one exception no service can remove: a request
  whose COMMIT was on the wire at the very instant the connection died. The server may have
  committed it and the client cannot know. Those are counted ("in doubt") and allowed only
  for requests in flight at a fault instant; any other failed write found in the database
  fails the test;
- once the database is back the service recovers by itself, within seconds.
"""

import random
import re
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import httpx
import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.engine import make_url

from backend.main import create_app
from backend.platform.config import Settings
from backend.platform.db import build_engine
from tests.live_server import serve
from tests.tcp_proxy import TcpProxy

# Short timeouts so that each fault resolves in seconds: a connection gets 2 s to open, a
# statement 1.5 s, any other wait on the network 1.5 + 2 = 3.5 s, a pool checkout 2 s.
FAULT_SETTINGS: dict[str, Any] = {
    "DB_POOL_SIZE": 4,
    "DB_MAX_OVERFLOW": 4,
    "DB_POOL_TIMEOUT_SECONDS": 2.0,
    "DB_CONNECT_TIMEOUT_SECONDS": 2,
    "DB_STATEMENT_TIMEOUT_MS": 1500,
    "DB_STARTUP_WAIT_SECONDS": 10.0,
}
NETWORK_DEADLINE = 3.5
# The longest a 503 may take: waiting for a pooled connection, then opening one, then one
# round trip, plus slack for a loaded 2-core machine. Measured maxima are far below.
SLOWEST_503 = FAULT_SETTINGS["DB_POOL_TIMEOUT_SECONDS"] + 2 + NETWORK_DEADLINE + 2.5
RECOVERY_BOUND = 5.0


# --- the service behind the proxy ---------------------------------------------------------------


@dataclass
class Service:
    url: str
    proxy: TcpProxy
    engine: Engine
    application_name: str
    pooled: bool  # through a pooler, whose server connections are what kill_backends kills


def _upstream_of(database_url: str) -> Callable[[], socket.socket]:
    """How the proxy reaches the real server: TCP, or the Unix socket of the embedded one."""
    url = make_url(database_url)
    port = url.port or 5432
    if url.host:
        return lambda: socket.create_connection((url.host, port), timeout=5)
    path = f"{url.query['host']}/.s.PGSQL.{port}"

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(path)
        return sock

    return connect


@pytest.fixture
def start_service(
    database_url: str, direct_database_url: str, settings: Settings
) -> Iterator[Callable[..., Service]]:
    """start_service(**setting_overrides): the app on its own engine, through its own proxy,
    to the database as the other tests reach it (through a pooler if they do), or directly
    with `direct=True`."""
    stack = ExitStack()

    def start(*, direct: bool = False, **overrides: Any) -> Service:
        proxy = TcpProxy(_upstream_of(direct_database_url if direct else database_url))
        stack.callback(proxy.close)
        url = make_url(database_url).set(host="127.0.0.1", port=proxy.port)
        url = url.difference_update_query(["host"])
        service_settings = settings.model_copy(
            update={
                **FAULT_SETTINGS,
                **overrides,
                "DATABASE_URL": url.render_as_string(hide_password=False),
            }
        )
        engine = build_engine(service_settings, autocommit=True)  # as create_app builds it
        stack.callback(engine.dispose)
        # A name of its own, so that the test kills this service's backends and no others.
        application_name = f"faults-{uuid.uuid4().hex[:8]}"

        @event.listens_for(engine, "connect")
        def _name(dbapi_connection: Any, _record: Any) -> None:
            with dbapi_connection.cursor() as cursor:
                cursor.execute(
                    "SELECT set_config('application_name', %s, false)", (application_name,)
                )
            dbapi_connection.commit()

        base = stack.enter_context(serve(create_app(service_settings, engine=engine)))
        stack.callback(proxy.restore)  # first of all: let the service shut down cleanly
        pooled = not direct and database_url != direct_database_url
        return Service(base, proxy, engine, application_name, pooled)

    with stack:
        yield start


@pytest.fixture
def service(start_service: Callable[..., Service]) -> Service:
    return start_service()


@pytest.fixture(autouse=True)
def no_errors_logged(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    """Whatever the fault, the service logs warnings (db.unavailable), never an error or a
    traceback: a database outage is expected weather, not a bug to page someone for."""
    yield
    logged_events(capsys)


def logged_events(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The events the service logged since the last call; fails on any error or traceback."""
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).splitlines()
    errors = [
        line
        for line in lines
        if '"level": "error"' in line or '"level": "critical"' in line or "Traceback" in line
    ]
    assert not errors, errors[:5]
    # By pattern, not json.loads: lines written by several threads at once may share a line.
    return re.findall(r'"event": "([^"]*)"', captured.out + captured.err)


def report(capsys: pytest.CaptureFixture[str], *parts: object) -> None:
    with capsys.disabled():
        print(*parts)


@pytest.fixture
def users(committed_users: Callable[..., list[str]]) -> list[str]:
    """Eight users committed for real; their tasks go with them afterwards (ON DELETE CASCADE)."""
    return committed_users(8, "fault")


def kill_backends(engine: Engine, application_name: str, *, state: str | None = None) -> int:
    """pg_terminate_backend on the service's connections (waiting until each is gone)."""
    condition = "" if state is None else " AND state = :state"
    with engine.connect() as connection:
        killed = connection.execute(
            text(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) "
                f"FROM pg_stat_activity WHERE application_name = :name{condition}"
            ),
            {"name": application_name, "state": state},
        ).scalar_one()
    return int(killed)


# --- load, and what the clients were told -------------------------------------------------------


@dataclass
class Outcome:
    user_id: str
    op: str  # create | rename | toggle
    task_id: int | None
    sent_title: str | None
    status: int
    body: Any
    retry_after: str | None
    started: float
    ended: float


class ClientPerUser:
    """One client thread per user, each running `_work(user_id)` until the `with` block ends;
    a client still running `join_timeout` seconds after that has hung, and fails the test."""

    users: list[str]
    join_timeout: ClassVar[float] = 60.0
    _stop: threading.Event
    _threads: list[threading.Thread]

    def _work(self, user_id: str) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        for user_id in self.users:
            thread = threading.Thread(target=self._work, args=(user_id,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.join_timeout)
        assert not any(t.is_alive() for t in self._threads), "a client hung"


@dataclass
class Load(ClientPerUser):
    """Workers, one per user, each doing creates, renames and toggles on its own tasks in turn.

    After a failed operation on a task the worker leaves that task alone, so a failed request is
    always the last thing that happened to its task and its effect (or absence) is checkable.
    """

    base_url: str
    users: list[str]
    token_for: Callable[[str], str]
    outcomes: list[Outcome] = field(default_factory=list)
    faults: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def fault(self) -> Iterator[None]:
        """Marks the instant a fault is injected: requests in flight across it may be in doubt."""
        started = time.monotonic()
        yield
        self.faults.append((started, time.monotonic()))

    def _work(self, user_id: str) -> None:
        rng = random.Random(user_id)
        headers = {"Authorization": f"Bearer {self.token_for(user_id)}"}
        base = f"{self.base_url}/api/{user_id}/tasks"
        live: list[int] = []
        with httpx.Client(headers=headers, timeout=30) as client:
            while not self._stop.is_set():
                roll = rng.random()
                if not live or roll < 0.3:
                    title = f"t-{uuid.uuid4().hex}"
                    outcome = self._call(
                        client, user_id, "create", None, title, "POST", base, {"title": title}
                    )
                    if outcome.status == 201:
                        live.append(outcome.body["id"])
                    continue
                task_id = rng.choice(live)
                if roll < 0.65:
                    title = f"t-{uuid.uuid4().hex}"
                    outcome = self._call(
                        client,
                        user_id,
                        "rename",
                        task_id,
                        title,
                        "PATCH",
                        f"{base}/{task_id}",
                        {"title": title},
                    )
                else:
                    outcome = self._call(
                        client,
                        user_id,
                        "toggle",
                        task_id,
                        None,
                        "PATCH",
                        f"{base}/{task_id}/complete",
                        None,
                    )
                if outcome.status != 200:
                    live.remove(task_id)
                if outcome.status == 503:
                    time.sleep(0.05)  # a polite client backs off (Retry-After says 2 s)

    def _call(
        self,
        client: httpx.Client,
        user_id: str,
        op: str,
        task_id: int | None,
        title: str | None,
        method: str,
        url: str,
        body: dict[str, Any] | None,
    ) -> Outcome:
        started = time.monotonic()
        response = client.request(method, url, json=body)
        ended = time.monotonic()
        outcome = Outcome(
            user_id,
            op,
            task_id,
            title,
            response.status_code,
            response.json(),
            response.headers.get("retry-after"),
            started,
            ended,
        )
        with self._lock:
            self.outcomes.append(outcome)
        return outcome

    def in_doubt(self, outcome: Outcome) -> bool:
        return any(outcome.started <= end and start <= outcome.ended for start, end in self.faults)


def statuses(outcomes: list[Outcome]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    return counts


def check_told_vs_stored(load: Load, engine: Engine) -> dict[str, int]:
    """Every acknowledged write is stored; every failed one left nothing behind (or was in
    flight at a fault instant). Returns the figures."""
    outcomes = load.outcomes
    assert outcomes, "the load made no requests"
    unexpected = {o.status for o in outcomes} - {200, 201, 503}
    assert not unexpected, f"statuses other than 200/201/503: {statuses(outcomes)}"
    for outcome in outcomes:
        if outcome.status == 503:
            assert outcome.retry_after is not None
            assert isinstance(outcome.body["detail"], str)
            assert "Traceback" not in outcome.body["detail"]
            assert outcome.ended - outcome.started < SLOWEST_503, outcome

    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT id, user_id, title, completed FROM tasks WHERE user_id = ANY(:users)"),
            {"users": load.users},
        ).all()
    stored = {row.id: row for row in rows}
    stored_titles = {row.title: row for row in rows}

    # Per task, in order: the state the last success reported, and what followed it.
    history: dict[int, list[Outcome]] = {}
    for outcome in sorted(outcomes, key=lambda o: o.started):
        task_id = (
            outcome.body["id"]
            if outcome.op == "create" and outcome.status == 201
            else outcome.task_id
        )
        if task_id is not None:
            history.setdefault(task_id, []).append(outcome)

    in_doubt_found = 0
    acknowledged = found = 0
    for outcome in outcomes:
        if outcome.op != "create":
            continue
        if outcome.status == 201:
            acknowledged += 1
            row = stored.get(outcome.body["id"])
            assert row is not None, f"acknowledged create lost: {outcome}"
            assert row.user_id == outcome.user_id
            found += 1
        elif outcome.sent_title in stored_titles:
            assert load.in_doubt(outcome), f"a failed create left a row behind: {outcome}"
            in_doubt_found += 1
    expected_ids = {o.body["id"] for o in outcomes if o.op == "create" and o.status == 201}
    extra = (
        set(stored)
        - expected_ids
        - {
            stored_titles[o.sent_title].id
            for o in outcomes
            if o.op == "create" and o.status != 201 and o.sent_title in stored_titles
        }
    )
    assert not extra, f"rows nobody was told about: {extra}"

    for task_id, steps in history.items():
        row = stored[task_id]
        successes = [s for s in steps if s.status in (200, 201)]
        told = successes[-1].body
        acknowledged += len(successes) - 1
        failed_after = [
            s for s in steps if s.status not in (200, 201) and s.started > successes[-1].started
        ]
        assert len(failed_after) <= 1
        matches_told = (row.title, row.completed) == (told["title"], told["completed"])
        if matches_told:
            found += len(successes) - 1
            continue
        # The only other allowed state: the failed last operation's effect, if it was in doubt.
        assert failed_after and load.in_doubt(failed_after[0]), (
            f"task {task_id} is {row.title!r}/{row.completed}, clients were told "
            f"{told['title']!r}/{told['completed']} and no request in doubt explains it"
        )
        failed = failed_after[0]
        if failed.op == "rename":
            assert (row.title, row.completed) == (failed.sent_title, told["completed"])
        else:
            assert (row.title, row.completed) == (told["title"], not told["completed"])
        in_doubt_found += 1
        found += len(successes) - 1

    counts = statuses(outcomes)
    return {
        "requests": len(outcomes),
        "ok": counts.get(200, 0) + counts.get(201, 0),
        "503": counts.get(503, 0),
        "writes_acknowledged": acknowledged,
        "writes_found": found,
        "in_doubt_found": in_doubt_found,
        "slowest_503_ms": int(
            1000 * max((o.ended - o.started for o in outcomes if o.status == 503), default=0)
        ),
    }


def wait_until_healthy(base_url: str, *, since: float) -> float:
    """Seconds from `since` until /health answers 200 (fails past RECOVERY_BOUND)."""
    with httpx.Client(timeout=10) as client:
        while True:
            if client.get(f"{base_url}/health").status_code == 200:
                return time.monotonic() - since
            assert time.monotonic() - since < RECOVERY_BOUND, "the service did not recover"
            time.sleep(0.05)


def assert_all_succeed_after(load: Load, instant: float) -> None:
    late = [o for o in load.outcomes if o.started > instant]
    assert late, "no requests after recovery"
    assert {o.status for o in late} <= {200, 201}, statuses(late)


@pytest.fixture
def load_on(users: list[str], make_token: Callable[..., str]) -> Callable[[Service], Load]:
    return lambda service: Load(service.url, users, make_token)


# --- the faults ---------------------------------------------------------------------------------


def test_connections_killed_while_idle_are_replaced_without_an_error(
    service, users, make_token, engine, capsys
):
    """Neon's suspend: every idle pooled connection is killed. Nobody may notice."""
    headers = {"Authorization": f"Bearer {make_token(users[0])}"}
    base = f"{service.url}/api/{users[0]}/tasks"
    with httpx.Client(headers=headers, timeout=30) as client:
        task_id = client.post(base, json={"title": "survives"}).json()["id"]
        killed = 0
        for round_ in range(3):
            # Several connections in the pool, then all of them killed while idle.
            threads = [
                threading.Thread(target=client.get, args=(f"{base}/{task_id}",)) for _ in range(6)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            found = kill_backends(engine, service.application_name, state="idle")
            # Through the pooler, its server connections come and go on their own (it recycles
            # them every few seconds), so at the instant of the kill it may hold none that last
            # served us: ask again, after another request, until one is found.
            deadline = time.monotonic() + 5
            while service.pooled and not found and time.monotonic() < deadline:
                client.get(f"{base}/{task_id}")
                found = kill_backends(engine, service.application_name, state="idle")
            killed += found
            for _ in range(10):
                response = client.patch(f"{base}/{task_id}/complete")
                assert response.status_code == 200, response.text
            assert client.get(f"{service.url}/health").status_code == 200, round_
    # Each dead connection was noticed at checkout and replaced (the pool hands them out in turn).
    # Through a pooler the pooler did so (its server connections were the ones killed, as many
    # as it kept): the service's connections to it stayed open.
    assert killed >= (1 if service.pooled else 3)
    discarded = logged_events(capsys).count("db.connection_discarded")
    assert discarded == (0 if service.pooled else killed)


@pytest.mark.parametrize("op", ["create", "rename"])
def test_connection_killed_mid_query_is_503_and_leaves_nothing(
    op, start_service, users, make_token, engine
):
    """The request is held on a row lock the test owns, its backend is killed, the lock freed.
    (A long statement timeout here, so that it is certainly the kill that ends the wait.)"""
    service = start_service(DB_STATEMENT_TIMEOUT_MS=20_000)
    user_id = users[0]
    headers = {"Authorization": f"Bearer {make_token(user_id)}"}
    base = f"{service.url}/api/{user_id}/tasks"
    with httpx.Client(headers=headers, timeout=30) as client:
        task = client.post(base, json={"title": "before"}).json()
        blocker = engine.connect()
        transaction = blocker.begin()
        if op == "create":  # the INSERT's foreign-key check waits for the user row
            blocker.execute(text('SELECT 1 FROM "user" WHERE id = :id FOR UPDATE'), {"id": user_id})
            request = ("POST", base, {"title": "never stored"})
        else:
            blocker.execute(
                text("SELECT 1 FROM tasks WHERE id = :id FOR UPDATE"), {"id": task["id"]}
            )
            request = ("PATCH", f"{base}/{task['id']}", {"title": "never stored"})
        answer: dict[str, Any] = {}

        def send() -> None:
            started = time.monotonic()
            answer["response"] = client.request(request[0], request[1], json=request[2])
            answer["seconds"] = time.monotonic() - started

        sender = threading.Thread(target=send)
        sender.start()
        try:
            waiting = _wait_for_lock_waiter(engine, service.application_name)
            with engine.connect() as admin:
                admin.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": waiting})
            sender.join(timeout=15)
        finally:
            transaction.rollback()
            blocker.close()
        response = answer["response"]
        assert response.status_code == 503, response.text
        assert answer["seconds"] < 15
        assert response.headers["retry-after"]
        assert response.json() == {"detail": "The database is unavailable; please retry shortly"}
        with engine.connect() as connection:
            titles = (
                connection.execute(
                    text("SELECT title FROM tasks WHERE user_id = :u"), {"u": user_id}
                )
                .scalars()
                .all()
            )
        assert titles == ["before"]
        # And the very next request is served.
        assert client.patch(f"{base}/{task['id']}", json={"title": "after"}).status_code == 200


def _wait_for_lock_waiter(engine: Engine, application_name: str) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            pid = connection.execute(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = :name "
                    "AND wait_event_type = 'Lock'"
                ),
                {"name": application_name},
            ).scalar()
        if pid is not None:
            return int(pid)
        time.sleep(0.02)
    raise AssertionError("the request never reached the lock")


def test_network_cuts_and_server_kills_under_load(service, load_on, engine, capsys):
    """Connections dropped mid-flight, again and again: acknowledged writes all stored."""
    with load_on(service) as load:
        time.sleep(1.0)
        for _ in range(4):
            with load.fault():
                service.proxy.cut()
            time.sleep(0.6)
            with load.fault():
                kill_backends(engine, service.application_name)
            time.sleep(0.6)
        recovered_at = time.monotonic()
        time.sleep(1.5)
    figures = check_told_vs_stored(load, engine)
    assert figures["ok"] > 50, figures
    assert_all_succeed_after(load, recovered_at + 0.5)
    report(capsys, "cuts and kills:", figures)


def test_database_refusing_connections_is_a_prompt_503_then_recovers(
    service, load_on, engine, capsys
):
    with load_on(service) as load:
        time.sleep(0.8)
        with load.fault():
            service.proxy.refuse()
        refused_at = time.monotonic()
        time.sleep(2.0)
        with httpx.Client(timeout=10) as client:
            health = client.get(f"{service.url}/health")
        assert health.status_code == 503
        assert health.headers["retry-after"]
        back = time.monotonic()
        service.proxy.restore()
        recovery = wait_until_healthy(service.url, since=back)
        recovered_at = time.monotonic()
        time.sleep(1.5)
    figures = check_told_vs_stored(load, engine)
    during = [o for o in load.outcomes if refused_at + 0.2 < o.started and o.ended < back]
    assert during and {o.status for o in during} == {503}
    # Refused is refused: no timeout involved, the answers come at once (the median, so that
    # a CPU-starved moment on a busy machine does not count as waiting for a timeout).
    assert statistics.median(o.ended - o.started for o in during) < 0.5
    assert_all_succeed_after(load, recovered_at + 0.5)
    report(capsys, "refused:", figures, f"recovered in {recovery:.2f} s")


def test_stalled_network_is_a_503_within_the_deadline_then_recovers(
    service, load_on, engine, capsys
):
    """The proxy takes the bytes and forwards nothing: no error ever comes from the network,
    so only the client-side deadline (the wait callback) ends the wait."""
    with load_on(service) as load:
        time.sleep(0.8)
        with load.fault():
            service.proxy.stall()
        stalled_at = time.monotonic()
        time.sleep(NETWORK_DEADLINE + 2.5)
        with httpx.Client(timeout=30) as client:
            started = time.monotonic()
            health = client.get(f"{service.url}/health")
            health_seconds = time.monotonic() - started
        assert health.status_code == 503
        assert health_seconds < SLOWEST_503
        back = time.monotonic()
        service.proxy.restore()
        recovery = wait_until_healthy(service.url, since=back)
        time.sleep(1.5)
    figures = check_told_vs_stored(load, engine)
    during = [o for o in load.outcomes if o.started > stalled_at and o.ended < back]
    assert during and {o.status for o in during} == {503}, statuses(during)
    assert_all_succeed_after(load, back + recovery + 0.5)
    report(
        capsys,
        "stalled:",
        figures,
        f"health 503 in {health_seconds:.2f} s, recovered in {recovery:.2f} s",
    )


CROWD = 100


def test_pool_exhaustion_is_a_prompt_503_and_a_statement_timeout_frees_the_pool(
    start_service, users, make_token, engine
):
    service = start_service(
        DB_POOL_SIZE=2, DB_MAX_OVERFLOW=0, DB_POOL_TIMEOUT_SECONDS=1.0, DB_STATEMENT_TIMEOUT_MS=4000
    )
    user_id = users[0]
    headers = {"Authorization": f"Bearer {make_token(user_id)}"}
    base = f"{service.url}/api/{user_id}/tasks"
    with httpx.Client(headers=headers, timeout=30) as client:
        task_id = client.post(base, json={"title": "contended"}).json()["id"]
        with engine.connect() as blocker, blocker.begin():
            blocker.execute(text("SELECT 1 FROM tasks WHERE id = :id FOR UPDATE"), {"id": task_id})
            held: list[tuple[int, float]] = []

            def toggle() -> None:
                started = time.monotonic()
                status = client.patch(f"{base}/{task_id}/complete").status_code
                held.append((status, time.monotonic() - started))

            holders = [threading.Thread(target=toggle) for _ in range(2)]
            for thread in holders:
                thread.start()
            _wait_for_waiters(engine, service.application_name, 2)

            # Both connections are pinned by requests waiting on the lock: each of a crowd of
            # requests arriving at once waits DB_POOL_TIMEOUT_SECONDS for one, not longer,
            # then gets a 503 (no queue in front of the wait, such as for a worker thread).
            def timed_get(_: int) -> tuple[int, str | None, float]:
                started = time.monotonic()
                response = client.get(f"{base}/{task_id}")
                waited = time.monotonic() - started
                return response.status_code, response.headers.get("retry-after"), waited

            with ThreadPoolExecutor(max_workers=CROWD) as pool:
                crowd = list(pool.map(timed_get, range(CROWD)))
            assert {status for status, _, _ in crowd} == {503}
            assert all(retry_after for _, retry_after, _ in crowd)
            waits = sorted(waited for _, _, waited in crowd)
            assert 0.9 < waits[0] and waits[-1] < 2.5, waits
            for thread in holders:
                thread.join(timeout=15)
        # The statement timeout (4 s) ended both waits: the slow requests did not hold the pool.
        assert [status for status, _ in held] == [503, 503]
        assert all(3.9 < seconds < 10 for _, seconds in held), held
        assert client.get(f"{base}/{task_id}").json()["completed"] is False
        assert client.patch(f"{base}/{task_id}/complete").json()["completed"] is True


def _wait_for_waiters(engine: Engine, application_name: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            waiting = connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name "
                    "AND wait_event_type = 'Lock'"
                ),
                {"name": application_name},
            ).scalar_one()
        if waiting >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"{count} requests never reached the lock")


def test_connection_killed_the_instant_it_opened_is_a_503_not_a_500(
    start_service, users, make_token, engine
):
    """The pool replaces a dead idle connection once per checkout; if the replacement is killed
    too before its first use, a second discard would exhaust SQLAlchemy's retries and raise
    InvalidRequestError (a 500). A connection that was just opened is not re-checked.
    Direct even when the other tests go through a pooler: a pooler opens its server connections
    apart from the service's, so there the kill would only ever reach the pooler's."""
    service = start_service(direct=True, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0)
    user_id = users[0]
    headers = {"Authorization": f"Bearer {make_token(user_id)}"}
    base = f"{service.url}/api/{user_id}/tasks"
    kills_on_arrival = [0]

    @event.listens_for(service.engine, "connect")
    def _kill_on_arrival(dbapi_connection: Any, _record: Any) -> None:
        if kills_on_arrival[0]:
            kills_on_arrival[0] -= 1
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                pid = cursor.fetchone()[0]
            with engine.connect() as admin:
                admin.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid})

    with httpx.Client(headers=headers, timeout=30) as client:
        task_id = client.post(base, json={"title": "x"}).json()["id"]
        assert kill_backends(engine, service.application_name, state="idle") == 1
        kills_on_arrival[0] = 1
        response = client.patch(f"{base}/{task_id}/complete")
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"]
        assert kills_on_arrival == [0]
        after = client.patch(f"{base}/{task_id}/complete")
        assert after.status_code == 200
        assert after.json()["completed"] is True  # the failed toggle left nothing behind


# --- the same faults, with clients that retry every write under its Idempotency-Key ------------


@dataclass
class KeyedWrite:
    """One intended write and every try it took: the same request under the same key."""

    user_id: str
    op: str  # create | rename | toggle | delete
    task_id: int | None
    title: str | None
    key: str
    tries: list[tuple[int | str, float, float]] = field(default_factory=list)
    status: int = 0
    body: Any = None
    replayed: bool = False


@dataclass
class KeyedLoad(ClientPerUser):
    """Workers, one per user, each doing creates, renames, toggles and deletes of its own tasks
    in turn, every write with a fresh key and retried with it (503, 409, or the request failing
    on the wire) until it succeeds. Nothing is ever left in doubt: afterwards each task must be
    exactly what its writes, each applied once and in order, make of it."""

    base_url: str
    users: list[str]
    token_for: Callable[[str], str]
    give_up_after: float = 30.0
    join_timeout: ClassVar[float] = 90.0
    writes: list[KeyedWrite] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _work(self, user_id: str) -> None:
        rng = random.Random(f"keyed-{user_id}")
        headers = {"Authorization": f"Bearer {self.token_for(user_id)}"}
        base = f"{self.base_url}/api/{user_id}/tasks"
        live: list[int] = []
        with httpx.Client(headers=headers, timeout=15) as client:
            while not self._stop.is_set():
                roll = rng.random()
                if not live or roll < 0.3:
                    title = f"k-{uuid.uuid4().hex}"
                    write = self._write(client, user_id, "create", None, title, "POST", base)
                    live.append(write.body["id"])
                    continue
                task_id = rng.choice(live)
                if roll < 0.6:
                    title = f"k-{uuid.uuid4().hex}"
                    self._write(
                        client, user_id, "rename", task_id, title, "PATCH", f"{base}/{task_id}"
                    )
                elif roll < 0.9:
                    self._write(
                        client,
                        user_id,
                        "toggle",
                        task_id,
                        None,
                        "PATCH",
                        f"{base}/{task_id}/complete",
                    )
                else:
                    self._write(
                        client, user_id, "delete", task_id, None, "DELETE", f"{base}/{task_id}"
                    )
                    live.remove(task_id)

    def _write(
        self,
        client: httpx.Client,
        user_id: str,
        op: str,
        task_id: int | None,
        title: str | None,
        method: str,
        url: str,
    ) -> KeyedWrite:
        write = KeyedWrite(user_id, op, task_id, title, key=str(uuid.uuid4()))
        with self._lock:
            self.writes.append(write)
        body = {"title": title} if title is not None else None
        deadline = time.monotonic() + self.give_up_after
        delay = 0.05
        while True:
            started = time.monotonic()
            try:
                response = client.request(
                    method, url, json=body, headers={"Idempotency-Key": write.key}
                )
            except httpx.TransportError as exc:
                write.tries.append((type(exc).__name__, started, time.monotonic()))
            else:
                write.tries.append((response.status_code, started, time.monotonic()))
                if response.status_code in (200, 201):
                    write.status, write.body = response.status_code, response.json()
                    write.replayed = response.headers.get("Idempotent-Replayed") == "true"
                    return write
                assert response.status_code in (409, 503), (response.status_code, response.text)
            assert time.monotonic() < deadline, f"a write never succeeded: {write}"
            time.sleep(delay)  # capped backoff (Retry-After says 2 s; the test is in a hurry)
            delay = min(delay * 2, 0.4)


def check_each_write_once(load: KeyedLoad, engine: Engine) -> dict[str, int]:
    """Replays each user's writes, in the order that user made them, over an empty table, and
    compares the result with the database: any write applied twice (a second task, a toggle
    flipped back) or not at all shows. Returns the figures."""
    writes = load.writes
    assert writes, "the load made no writes"
    expected: dict[int, tuple[str, str, bool]] = {}
    for write in writes:  # per user in order; users' tasks never meet
        assert write.status in (200, 201), write
        if write.op == "create":
            assert write.status == 201
            task_id = write.body["id"]
            assert task_id not in expected
            assert write.title is not None
            expected[task_id] = (write.user_id, write.title, False)
            continue
        assert write.task_id is not None
        assert write.body["id"] == write.task_id
        owner, title, completed = expected[write.task_id]
        if write.op == "rename":
            assert write.title is not None
            expected[write.task_id] = (owner, write.title, completed)
        elif write.op == "toggle":
            expected[write.task_id] = (owner, title, not completed)
        else:
            del expected[write.task_id]
        if not write.replayed:  # a replay is the first answer, not the state now
            assert (write.body["title"], write.body["completed"]) == (
                (title, completed) if write.op == "delete" else expected[write.task_id][1:]
            )
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT id, user_id, title, completed FROM tasks WHERE user_id = ANY(:users)"),
            {"users": load.users},
        ).all()
        keys = connection.execute(
            text("SELECT count(*) FROM idempotency_keys WHERE user_id = ANY(:users)"),
            {"users": load.users},
        ).scalar_one()
    assert {row.id: (row.user_id, row.title, row.completed) for row in rows} == expected
    assert keys == len(writes)  # every write recorded its key, exactly once
    tries = [t for w in writes for t in w.tries]
    return {
        "writes": len(writes),
        "requests": len(tries),
        "retried_writes": sum(len(w.tries) > 1 for w in writes),
        "503": sum(status == 503 for status, _s, _e in tries),
        "409": sum(status == 409 for status, _s, _e in tries),
        "transport_errors": sum(isinstance(status, str) for status, _s, _e in tries),
        "replayed": sum(w.replayed for w in writes),
        "most_tries": max(len(w.tries) for w in writes),
        "in_doubt_left": 0,
    }


def test_keyed_writes_retried_through_cuts_and_kills_each_happen_exactly_once(
    service, users, make_token, engine, capsys
):
    """The cut-and-kill test again, with clients doing what a frontend should: every write
    under its own Idempotency-Key, retried with it until it succeeds. The writes that were
    "in doubt" there (committed while their connection died) are answered here from the key's
    record on the retry: none is lost, none applied twice, none left to guess about."""
    with KeyedLoad(service.url, users, make_token) as load:
        time.sleep(1.0)
        for _ in range(4):
            service.proxy.cut()
            time.sleep(0.6)
            kill_backends(engine, service.application_name)
            time.sleep(0.6)
        time.sleep(1.5)
    figures = check_each_write_once(load, engine)
    assert figures["writes"] > 50, figures
    assert figures["retried_writes"] > 0, figures  # the faults did hit writes
    report(capsys, "keyed writes through cuts and kills:", figures)


def test_keyed_writes_held_and_killed_mid_statement_are_retried_once(
    start_service, users, make_token, engine
):
    """The connection-killed-mid-query case with a key: the 503 is retried with the same key
    and the write happens once. Then the case a 503 alone cannot settle: the write committed
    but its answer never came; the retry gets the stored answer, not a second task."""
    service = start_service(DB_STATEMENT_TIMEOUT_MS=20_000)
    user_id = users[0]
    headers = {"Authorization": f"Bearer {make_token(user_id)}", "Idempotency-Key": "held"}
    base = f"{service.url}/api/{user_id}/tasks"
    with httpx.Client(headers=headers, timeout=30) as client:
        blocker = engine.connect()
        transaction = blocker.begin()
        blocker.execute(text('SELECT 1 FROM "user" WHERE id = :id FOR UPDATE'), {"id": user_id})
        answer: dict[str, Any] = {}
        sender = threading.Thread(
            target=lambda: answer.update(r=client.post(base, json={"title": "once"}))
        )
        sender.start()
        try:
            waiting = _wait_for_lock_waiter(engine, service.application_name)
            with engine.connect() as admin:
                admin.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": waiting})
            sender.join(timeout=15)
        finally:
            transaction.rollback()
            blocker.close()
        assert answer["r"].status_code == 503
        retried = client.post(base, json={"title": "once"})
        assert retried.status_code == 201
        assert "idempotent-replayed" not in retried.headers  # the first never committed
        # The answer lost after the commit: the client retries what it cannot know succeeded.
        lost = client.post(base, json={"title": "once"})
        assert lost.status_code == 201
        assert lost.headers["Idempotent-Replayed"] == "true"
        assert lost.content == retried.content
    with engine.connect() as connection:
        titles = (
            connection.execute(text("SELECT title FROM tasks WHERE user_id = :u"), {"u": user_id})
            .scalars()
            .all()
        )
    assert titles == ["once"]
