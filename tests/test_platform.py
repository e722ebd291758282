"""The platform under every slice: settings, schema bootstrap, health, CORS, request ids and
logs, the OpenAPI contract, body limits, commit-before-response, and the deployment files."""

import gc
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psycopg2.extensions
import pytest
import yaml
from pydantic import ValidationError
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from backend.main import create_app
from backend.platform.config import EXAMPLE_SECRET, Settings
from tests.factories import TaskFactory

ROOT = Path(__file__).resolve().parent.parent
GOOD_SECRET = "s" * 32


def make_settings(**overrides):
    values = {"BETTER_AUTH_SECRET": GOOD_SECRET, **overrides}
    return Settings(_env_file=None, **values)


def json_lines(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


# --- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"BETTER_AUTH_SECRET": ""}, "BETTER_AUTH_SECRET is not set"),
        ({"BETTER_AUTH_SECRET": "s" * 31}, "at least 32"),
        ({"BETTER_AUTH_SECRET": EXAMPLE_SECRET}, "placeholder"),
        ({"CORS_ORIGINS": "*"}, "may not be '*'"),
        ({"JWT_ALGORITHMS": "HS256,none"}, "JWT_ALGORITHMS"),
        ({"JWT_ALGORITHMS": "RS256"}, "JWT_ALGORITHMS"),
        ({"AUTH_USER_TABLE": 'user"; drop table tasks; --'}, "AUTH_USER_TABLE"),
        ({"DATABASE_URL": "mysql://x@y/z"}, "DATABASE_URL"),
        ({"DB_POOL_RECYCLE_SECONDS": 300}, "DB_POOL_RECYCLE_SECONDS"),
        ({"JWT_LEEWAY_SECONDS": 3600}, "JWT_LEEWAY_SECONDS"),
    ],
)
def test_unsafe_settings_are_refused(overrides, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        make_settings(**overrides)


def test_secret_of_32_characters_is_enough():
    assert make_settings(BETTER_AUTH_SECRET="s" * 32).BETTER_AUTH_SECRET == "s" * 32


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://u:p@h:5432/db", "postgresql+psycopg2://u:p@h:5432/db"),
        ("postgresql://u:p@h/db", "postgresql+psycopg2://u:p@h/db"),
        (
            "postgresql://alex:pw@ep-cool-1234-pooler.eu-central-1.aws.neon.tech/neondb"
            "?sslmode=require&channel_binding=require",
            "postgresql+psycopg2://alex:pw@ep-cool-1234-pooler.eu-central-1.aws.neon.tech/neondb"
            "?sslmode=require&channel_binding=require",
        ),
    ],
)
def test_database_urls_are_taken_as_given(url, expected):
    assert make_settings(DATABASE_URL=url).sqlalchemy_url == expected


def test_service_refuses_to_start_without_a_secret(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "BETTER_AUTH_SECRET"}
    result = subprocess.run(
        [sys.executable, "-c", "import backend.main; backend.main.app"],
        cwd=tmp_path,  # no .env there
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Refusing to start" in result.stderr
    assert "BETTER_AUTH_SECRET is not set" in result.stderr
    assert "Traceback" not in result.stderr


def test_env_example_lists_every_setting():
    listed = set(re.findall(r"^([A-Z_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert set(Settings.model_fields) <= listed


# --- schema -------------------------------------------------------------------------------------


def test_schema_bootstrap_is_idempotent_and_exact(engine, settings):
    from backend.platform.db import transactional
    from backend.platform.db.migrate import upgrade_to_head

    with transactional(engine.connect()) as connection:  # a second time: nothing to do
        upgrade_to_head(connection, auth_user_table=settings.AUTH_USER_TABLE)
    with engine.connect() as connection:
        columns = connection.execute(
            text(
                "SELECT column_name, data_type, character_maximum_length, is_nullable, "
                "column_default FROM information_schema.columns WHERE table_name = 'tasks' "
                "AND table_schema = current_schema() ORDER BY ordinal_position"
            )
        ).all()
        fk = connection.execute(
            text(
                "SELECT confdeltype, confrelid::regclass::text FROM pg_constraint "
                "WHERE conrelid = 'tasks'::regclass AND contype = 'f'"
            )
        ).one()
        index = connection.execute(
            text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_tasks_user_id_created_at'")
        ).scalar_one()
    shape = {
        c.column_name: (c.data_type, c.character_maximum_length, c.is_nullable) for c in columns
    }
    assert shape == {
        "id": ("integer", None, "NO"),
        "user_id": ("text", None, "NO"),
        "title": ("character varying", 200, "NO"),
        "description": ("text", None, "YES"),
        "completed": ("boolean", None, "NO"),
        "created_at": ("timestamp with time zone", None, "NO"),
        "updated_at": ("timestamp with time zone", None, "NO"),
        "version": ("integer", None, "NO"),
    }
    defaults = {c.column_name: c.column_default for c in columns}
    assert defaults["version"] == "1"
    assert defaults["id"].startswith("nextval(")
    assert defaults["completed"] == "false"
    assert defaults["created_at"] == defaults["updated_at"] == "now()"
    assert fk == ("c", '"user"')  # ON DELETE CASCADE to Better Auth's table
    assert "(user_id, created_at DESC, id DESC)" in index


def test_users_table_has_exactly_better_auths_columns(engine):
    with engine.connect() as connection:
        names = connection.execute(
            text(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'user' "
                "AND table_schema = current_schema() ORDER BY ordinal_position"
            )
        ).scalars()
        assert list(names) == [
            "id",
            "name",
            "email",
            "emailVerified",
            "image",
            "createdAt",
            "updatedAt",
        ]


def test_custom_users_table_name(engine):
    from backend.platform.db.migrate import upgrade_to_head

    with engine.connect() as connection, connection.begin() as transaction:
        connection.execute(text("CREATE SCHEMA custom_users"))
        connection.execute(text("SET LOCAL search_path TO custom_users"))
        upgrade_to_head(connection, auth_user_table="users")
        target = connection.execute(
            text(
                "SELECT confrelid::regclass::text FROM pg_constraint "
                "WHERE conrelid = 'custom_users.tasks'::regclass AND contype = 'f'"
            )
        ).scalar_one()
        transaction.rollback()
    assert target == "users"


def test_deleting_a_user_deletes_their_tasks(session, user):
    TaskFactory(user_id=user.id)
    TaskFactory(user_id=user.id)
    session.execute(text('DELETE FROM "user" WHERE id = :id'), {"id": user.id})
    count = session.execute(
        text("SELECT count(*) FROM tasks WHERE user_id = :id"), {"id": user.id}
    ).scalar_one()
    assert count == 0


# --- health -------------------------------------------------------------------------------------


def test_health_is_ok_when_the_database_answers(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_start_up_objects_are_kept_out_of_the_garbage_collector(settings, engine):
    """Full collections that walk every module and validator stall all requests (p99)."""
    from fastapi.testclient import TestClient

    gc.unfreeze()
    with TestClient(create_app(settings, engine=engine)):
        assert gc.get_freeze_count() > 10_000


def test_health_is_503_when_the_database_is_away():
    from fastapi.testclient import TestClient

    settings = make_settings(
        DATABASE_URL="postgresql://postgres@127.0.0.1:1/nothing", DB_CONNECT_TIMEOUT_SECONDS=1
    )
    app = create_app(settings)
    started = time.monotonic()
    response = TestClient(app).get("/health")  # no lifespan: it would wait for the database
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable"}
    assert response.headers["retry-after"]
    assert time.monotonic() - started < 5


def test_task_routes_are_503_not_500_when_the_database_is_away(make_token):
    from fastapi.testclient import TestClient

    settings = make_settings(
        DATABASE_URL="postgresql://postgres@127.0.0.1:1/nothing", DB_CONNECT_TIMEOUT_SECONDS=1
    )
    client = TestClient(create_app(settings))
    token = make_token("alice", secret=GOOD_SECRET)
    response = client.post(
        "/api/alice/tasks", json={"title": "t"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 503
    assert response.headers["retry-after"]
    assert "detail" in response.json()


# --- CORS ---------------------------------------------------------------------------------------


def test_cors_preflight_from_the_frontend(client, user):
    response = client.options(
        f"/api/{user.id}/tasks",
        headers={
            "Origin": "http://localhost:3000",
            "Access-Control-Request-Method": "PATCH",
            "Access-Control-Request-Headers": "authorization,content-type,x-request-id",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    allowed = response.headers["access-control-allow-methods"]
    for method in ["GET", "POST", "PUT", "PATCH", "DELETE"]:
        assert method in allowed
    assert "authorization" in response.headers["access-control-allow-headers"].lower()


def test_cors_headers_on_actual_responses_errors_included(client, user):
    response = client.get(f"/api/{user.id}/tasks", headers={"Origin": "http://localhost:3000"})
    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()


def test_other_origins_are_not_echoed(client, user):
    for origin in ["http://evil.example", "http://localhost:3001", "null"]:
        preflight = client.options(
            f"/api/{user.id}/tasks",
            headers={"Origin": origin, "Access-Control-Request-Method": "GET"},
        )
        assert "access-control-allow-origin" not in preflight.headers
        simple = client.get(f"/api/{user.id}/tasks", headers={"Origin": origin})
        assert "access-control-allow-origin" not in simple.headers


# --- request ids and logs -----------------------------------------------------------------------


def test_request_id_is_generated_and_returned(client, capsys):
    capsys.readouterr()
    response = client.get("/health")
    request_id = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    (line,) = [x for x in json_lines(capsys.readouterr().out) if x["event"] == "request"]
    assert line["request_id"] == request_id
    assert (line["method"], line["path"], line["status"]) == ("GET", "/health", 200)
    assert isinstance(line["duration_ms"], float)
    assert line["level"] == "info" and "timestamp" in line


def test_generated_request_ids_are_distinct_across_buffers_threads_and_forks():
    from backend.platform.logging import new_request_id

    # 600 ids span three of the 4 KiB batches of random bytes they are cut from.
    ids = [new_request_id() for _ in range(600)]
    others: list[str] = []
    worker = threading.Thread(target=lambda: others.extend(new_request_id() for _ in range(300)))
    worker.start()
    worker.join()
    assert all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in ids + others)
    assert len(set(ids + others)) == 900
    # A forked child does not go on cutting ids from the bytes its parent already holds.
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    from_child = os.read(read, 64).decode()
    os.close(read)
    assert from_child != new_request_id()


def test_request_id_from_the_client_is_sanitised_and_capped(client):
    assert client.get("/health", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == (
        "abc-123"
    )
    hostile = client.get("/health", headers={"X-Request-ID": 'a"b\\c<script> ' + "x" * 200})
    returned = hostile.headers["x-request-id"]
    assert returned.startswith("abcscript") and len(returned) == 64
    blank = client.get("/health", headers={"X-Request-ID": "\"'<>"})
    assert re.fullmatch(r"[0-9a-f]{32}", blank.headers["x-request-id"])


def test_one_log_line_per_request(client, user, make_token, capsys):
    capsys.readouterr()
    client.get(f"/api/{user.id}/tasks", headers={"Authorization": f"Bearer {make_token(user)}"})
    client.get(f"/api/{user.id}/tasks/abc", headers={"Authorization": f"Bearer {make_token(user)}"})
    lines = [x for x in json_lines(capsys.readouterr().out) if x["event"] == "request"]
    assert [x["status"] for x in lines] == [200, 404]


# --- body size ----------------------------------------------------------------------------------


def test_oversized_body_is_413_before_anything_else(api, user, session):
    big = {"title": "x", "description": "d" * (1024 * 1024)}
    response = api.post("/tasks", json=big)
    assert response.status_code == 413
    assert "detail" in response.json()


def test_oversized_streamed_body_is_413(api):
    def chunks():
        for _ in range(100):
            yield b"x" * 1024

    response = api.post("/tasks", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["detail"].startswith("Request body exceeds")


# --- OpenAPI ------------------------------------------------------------------------------------


def test_every_operation_is_routed_by_the_app_itself(settings, engine):
    """`mount_routes`: behind `include_router` each slice was a layer every request walked in
    turn (12% of the CPU of a toggle); the app's own list must hold each route."""
    from fastapi.routing import APIRoute

    app = create_app(settings, engine=engine)
    routed = {
        (method, route.path)
        for route in app.router.routes
        if isinstance(route, APIRoute)
        for method in route.methods
    }
    task = "/api/{user_id}/tasks/{task_id}"
    assert routed == {
        ("POST", "/api/{user_id}/tasks"),
        ("GET", "/api/{user_id}/tasks"),
        ("GET", task),
        ("PUT", task),
        ("PATCH", task),
        ("DELETE", task),
        ("PATCH", task + "/complete"),
        ("GET", "/health"),
    }


def test_openapi_documents_the_bearer_scheme_and_errors(client):
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["BetterAuthJWT"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": schemes["BetterAuthJWT"]["description"],
    }
    operations = [
        (path, method, op)
        for path, item in schema["paths"].items()
        if path.startswith("/api/")
        for method, op in item.items()
    ]
    assert len(operations) == 7
    for path, method, op in operations:
        assert {"401", "403", "404", "422"} <= set(op["responses"]), (path, method)
        assert op["security"] == [{"BetterAuthJWT": []}], (path, method)
        # Documented by the route class, not by a dependency: once, as a required path string.
        user_ids = [p for p in op["parameters"] if p["name"] == "user_id"]
        assert len(user_ids) == 1, (path, method)
        assert user_ids[0]["in"] == "path" and user_ids[0]["required"] is True
        assert user_ids[0]["schema"]["type"] == "string"
        assert op["responses"]["401"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorDetail"
        }


# --- writes are committed before the response ---------------------------------------------------


def test_write_is_committed_before_the_handler_returns(
    live_app, live_url, committed_user, make_token, engine
):
    """The request is held just after its handler has run, before any response is sent; the
    row must already be visible to another connection, so the commit cannot come later."""
    handler_done, release = threading.Event(), threading.Event()
    database = live_app.state.database

    class HeldAfterHandler:
        async def run(self, handler, /, **kwargs):
            result = await database.run(handler, **kwargs)
            handler_done.set()
            await run_in_threadpool(release.wait, 10)
            return result

    live_app.state.database = HeldAfterHandler()
    result = {}
    headers = {"Authorization": f"Bearer {make_token(committed_user)}"}

    def send():
        result["response"] = httpx.post(
            f"{live_url}/api/{committed_user}/tasks", json={"title": "durable"}, headers=headers
        )

    sender = threading.Thread(target=send)
    try:
        sender.start()
        assert handler_done.wait(10)
        assert "response" not in result
        with engine.connect() as connection:
            visible = (
                connection.execute(
                    text("SELECT title FROM tasks WHERE user_id = :u"), {"u": committed_user}
                )
                .scalars()
                .all()
            )
        assert visible == ["durable"]
    finally:
        release.set()
        sender.join(15)
        live_app.state.database = database
    assert result["response"].status_code == 201


def test_get_right_after_a_write_sees_it(live_url, committed_user, make_token):
    headers = {"Authorization": f"Bearer {make_token(committed_user)}"}
    base = f"{live_url}/api/{committed_user}/tasks"
    with httpx.Client(headers=headers) as http:
        for i in range(20):
            created = http.post(base, json={"title": f"t{i}"}).json()
            assert http.get(f"{base}/{created['id']}").json() == created
            toggled = http.patch(f"{base}/{created['id']}/complete").json()
            assert http.get(f"{base}/{created['id']}").json()["completed"] is toggled["completed"]


# --- how it is run ------------------------------------------------------------------------------


def test_uvicorn_serves_backend_main_app(database_url):
    """Plain `uvicorn backend.main:app` still serves (without the header limits: README)."""
    port = 18000 + os.getpid() % 1000
    env = {**os.environ, "DATABASE_URL": database_url, "BETTER_AUTH_SECRET": GOOD_SECRET}
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "backend.main:app", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health")
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert response.json() == {"status": "ok"}
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0].decode()
    lines = json_lines(output)  # not a terminal: JSON lines
    assert any(x.get("event") == "request" and x.get("path") == "/health" for x in lines)


def test_compose_file_describes_db_and_api():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    db, api = compose["services"]["db"], compose["services"]["api"]
    assert db["image"].startswith("postgres:")
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert api["build"] == "."
    assert api["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert api["env_file"] == ".env" and db["env_file"] == ".env"
    assert "@db:5432/" in api["environment"]["DATABASE_URL"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    # The launcher (backend.main:app with the header-limited protocol), not plain uvicorn.
    assert '"python", "-m", "backend"' in dockerfile
    assert "COPY pyproject.toml uv.lock" in dockerfile and "uv sync --frozen" in dockerfile


# --- the pool -----------------------------------------------------------------------------------


def test_pool_is_sized_and_timed_from_settings(database_url):
    from backend.platform.db import build_engine

    settings = make_settings(
        DATABASE_URL=database_url,
        DB_POOL_SIZE=3,
        DB_MAX_OVERFLOW=2,
        DB_POOL_TIMEOUT_SECONDS=1.5,
        DB_POOL_RECYCLE_SECONDS=120,
        DB_STATEMENT_TIMEOUT_MS=1234,
    )
    engine = build_engine(settings)
    try:
        assert engine.pool.size() == 3
        assert engine.pool._max_overflow == 2
        assert engine.pool.timeout() == 1.5
        assert engine.pool._recycle == 120
        with engine.connect() as connection:
            # Each statement carries the timeout, and the transaction it ran in ends it: the
            # connection keeps no setting that a pooler would hand on to its other clients.
            assert connection.execute(text("SHOW statement_timeout")).scalar_one() == "1234ms"
            assert (
                connection.execute(text("SHOW idle_in_transaction_session_timeout")).scalar_one()
                == "1min"
            )
            connection.commit()
            with connection.connection.dbapi_connection.cursor(
                cursor_factory=psycopg2.extensions.cursor
            ) as plain:
                plain.execute("SHOW statement_timeout")
                assert plain.fetchone() == ("0",)
    finally:
        engine.dispose()


def test_connection_killed_while_idle_is_replaced_without_an_error(direct_database_url):
    """Direct even when the suite runs through a pooler: there the pooler's server connection is
    what gets killed, and noticing that is the pooler's job."""
    from backend.platform.db import build_engine

    database_url = direct_database_url
    engine = build_engine(make_settings(DATABASE_URL=database_url, DB_POOL_SIZE=1))
    try:
        with engine.connect() as connection:
            first_pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
        # What Neon's suspend or a server restart does to an idle pooled connection.
        admin = build_engine(make_settings(DATABASE_URL=database_url))
        with admin.connect() as connection:
            # With a timeout, it returns once the backend has exited (no sleep to guess).
            connection.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": first_pid})
        admin.dispose()
        with engine.connect() as connection:
            second_pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
        assert second_pid != first_pid
    finally:
        engine.dispose()


def test_unknown_user_is_logged_as_an_auth_failure(client, make_token, capsys):
    capsys.readouterr()
    headers = {"Authorization": f"Bearer {make_token('nobody-here')}"}
    assert (
        client.post("/api/nobody-here/tasks", json={"title": "x"}, headers=headers).status_code
        == 401
    )
    failures = [x for x in json_lines(capsys.readouterr().out) if x["event"] == "auth.failed"]
    assert [(x["reason"], x["status"]) for x in failures] == [("unknown_user", 401)]


def test_log_lines_from_concurrent_threads_never_share_a_line(client, capsys):
    import logging

    import structlog

    capsys.readouterr()
    ours, foreign = structlog.get_logger("concurrency"), logging.getLogger("sqlalchemy.check")

    def write(n):
        for i in range(200):
            ours.info("ours", n=n, i=i, pad="x" * 300)
            foreign.warning("foreign %s %s %s", n, i, "y" * 300)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, as real I/O would
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    lines = capsys.readouterr().out.splitlines()
    parsed = [json.loads(line) for line in lines]  # every line is one whole JSON object
    assert sum(1 for x in parsed if x["event"] == "ours") == 1600
    assert sum(1 for x in parsed if x["event"].startswith("foreign")) == 1600


def test_timestamps_are_answered_in_utc_whatever_the_connection_time_zone(session, task):
    """Connections keep the server's time zone (a session SET would leak through a pooler in
    transaction mode, Neon's), whatever it is: tasks are still answered in UTC."""
    from sqlalchemy import select

    from backend.features.task_model import TASK_COLUMNS, TASKS, TaskRead

    session.execute(text("SET LOCAL TIME ZONE 'Asia/Kolkata'"))
    rows = session.connection().execute(select(*TASK_COLUMNS).where(TASKS.c.id == task.id)).all()
    assert rows[0].created_at.utcoffset().total_seconds() == 5.5 * 3600
    for read in [TaskRead.from_row(rows[0]), *TaskRead.from_rows(rows)]:
        assert read.created_at == rows[0].created_at  # the same instant...
        answered = json.loads(read.model_dump_json())  # ...written in UTC
        assert answered["created_at"].endswith("Z") and answered["updated_at"].endswith("Z")


# --- what log lines may carry ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://alice:s3cret@auth.example.com/jwks?tenant=a", "https://auth.example.com/jwks?tenant=a"),
        ("postgresql://u:p@db:5432/app?sslmode=require&password=x", "postgresql://db:5432/app?sslmode=require&password=***"),
        ("postgresql://postgres:@/postgres?host=/run/pg", "postgresql:///postgres?host=/run/pg"),
        ("https://h/k?X-Amz-Signature=abc&api_key=k#top", "https://h/k?X-Amz-Signature=***&api_key=***#top"),
        ("http://127.0.0.1:8000/api/auth/jwks", "http://127.0.0.1:8000/api/auth/jwks"),
    ],
)  # fmt: skip
def test_redacted_url_drops_userinfo_and_secret_parameters(url, shown):
    from backend.platform.logging import redacted_url

    assert redacted_url(url) == shown


_CONSOLE_SCRIPT = r"""
import logging, sys
from fastapi.testclient import TestClient
from backend.main import create_app
from backend.platform.config import Settings

settings = Settings(_env_file=None, BETTER_AUTH_SECRET="x" * 32, LOG_FORMAT="console")
client = TestClient(create_app(settings))
for path in sys.argv[1:]:
    assert client.get(path).status_code == 401
logging.getLogger("uvicorn.error").warning("foreign %s", "\x1b[2J\u2028forged")
try:
    raise ValueError("boom\x1b[31m")
except ValueError:
    logging.getLogger("uvicorn.error").exception("failed")
"""


def test_console_logs_escape_control_characters():
    """With LOG_FORMAT=console a path needing no token could write ESC, a newline (a forged log
    line), DEL or C1's CSI into the log; each is escaped, one event stays one line, and a
    traceback keeps its own lines. (In a process of its own: structlog's loggers keep the
    processors they were first used with.)"""
    paths = ["/api/%1b%5B31mred/tasks", "/api/x%0a2026-01-01 [info] forged/tasks",
             "/api/%7f/tasks", "/api/%c2%9b31m/tasks"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", _CONSOLE_SCRIPT, *paths],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]", out), repr(out)
    lines = out.splitlines()  # splits at every line separator Python knows, not only \n
    events = [line for line in lines if re.match(r"\d{4}-\d\d-\d\dT", line)]
    traceback = lines[lines.index(events[-1]) + 1 :]
    assert len(events) + len(traceback) == len(lines)  # nothing else: no forged line
    # Each request: its auth failure, its request line and the test client's (httpx) line; then
    # the foreign line and the error.
    assert len(events) == 3 * len(paths) + 2
    assert sum(" request " in line or "request  " in line for line in events) >= len(paths)
    assert any("\\x1b[31mred" in line for line in events)
    assert any("\\x0a2026-01-01 [info] forged" in line for line in events)  # repr: one more \\
    assert any("\\x7f" in line for line in events)
    assert any("\\x9b31m" in line for line in events)
    assert "foreign \\x1b[2J\\u2028forged" in events[-2]
    assert traceback[0].startswith("Traceback") and len(traceback) > 2
    assert traceback[-1] == "ValueError: boom\\x1b[31m"
