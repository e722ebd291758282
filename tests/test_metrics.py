"""GET /metrics in one process: who may scrape it, what it reports, and under which labels.

The metrics are process-wide (as prometheus-client's are), so each test compares a scrape
before and after what it does. Across workers: tests/test_metrics_workers.py.
"""

import asyncio
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlmodel import Session

from backend.main import create_app
from backend.platform.config import EXAMPLE_METRICS_TOKEN, Settings
from backend.platform.jwks import JwksCache
from backend.platform.telemetry import metrics as metrics_module
from backend.platform.telemetry import workers
from backend.platform.telemetry.metrics import enable_metrics
from conftest import TEST_SECRET, UserClient
from tests.factories import TaskFactory
from tests.in_test_transaction import serve_in_session, stop_serving_in_session

METRICS_TOKEN = "metrics-test-token-0123456789-abcdefghijkl"
SCRAPE = {"Authorization": f"Bearer {METRICS_TOKEN}"}
DURATION = "http_server_request_duration_seconds"
TASK_ROUTE = "/api/{user_id}/tasks/{task_id}"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(body: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(scraped: Samples, name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def metrics_app(settings: Settings, engine: Engine) -> FastAPI:
    return create_app(settings.model_copy(update={"METRICS_TOKEN": METRICS_TOKEN}), engine=engine)


@pytest.fixture
def metrics_client(metrics_app: FastAPI, session: Session) -> Iterator[TestClient]:
    serve_in_session(metrics_app, session)
    try:
        yield TestClient(metrics_app)
    finally:
        stop_serving_in_session(metrics_app)


@pytest.fixture
def scrape(metrics_client: TestClient) -> Callable[[], Samples]:
    def scrape_now() -> Samples:
        response = metrics_client.get("/metrics", headers=SCRAPE)
        assert response.status_code == 200, response.text
        return samples(response.text)

    return scrape_now


# --- who may scrape -----------------------------------------------------------------------------


def test_metrics_do_not_exist_without_a_token(client):
    response = client.get("/metrics", headers=SCRAPE)
    assert response.status_code == 404


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-0123456789-abcdefghijklmnop"},
        {"Authorization": f"Bearer {METRICS_TOKEN[:-1]}"},
        {"Authorization": f"Bearer {METRICS_TOKEN}x"},
        {"Authorization": f"Basic {METRICS_TOKEN}"},
        {"Authorization": METRICS_TOKEN},
        {"Authorization": f"Bearer {TEST_SECRET}"},
    ],
    ids=["none", "wrong", "prefix", "longer", "basic", "no-scheme", "auth-secret"],
)
def test_metrics_refuse_anything_but_the_token(metrics_client, headers):
    response = metrics_client.get("/metrics", headers=headers)
    assert response.status_code == 401
    assert response.json() == {
        "detail": "GET /metrics needs `Authorization: Bearer <METRICS_TOKEN>`"
    }
    assert response.headers["www-authenticate"] == "Bearer"


def test_metrics_refuse_two_authorization_headers(metrics_client):
    response = metrics_client.get(
        "/metrics", headers=[("Authorization", f"Bearer {METRICS_TOKEN}")] * 2
    )
    assert response.status_code == 401


def test_metrics_token_is_compared_in_constant_time(metrics_client, monkeypatch):
    compared: list[tuple[bytes, bytes]] = []
    real = metrics_module.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(metrics_module.hmac, "compare_digest", spy)
    assert (
        metrics_client.get("/metrics", headers={"Authorization": "Bearer guess"}).status_code == 401
    )
    assert metrics_client.get("/metrics", headers=SCRAPE).status_code == 200
    assert compared == [(b"guess", METRICS_TOKEN.encode()), (METRICS_TOKEN.encode(),) * 2]


def test_metrics_are_left_out_of_the_openapi_document(metrics_client):
    paths = metrics_client.get("/openapi.json").json()["paths"]
    assert "/metrics" not in paths
    assert "/health" in paths


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        (EXAMPLE_METRICS_TOKEN, "still the placeholder"),
        ("short-token", "at least 32"),
        ("a token with spaces in it 0123456789", "printable ASCII"),
        ("tëken-0123456789-abcdefghijklmnopqrstuvwxyz", "printable ASCII"),
        (TEST_SECRET, "may not be BETTER_AUTH_SECRET"),
    ],
)
def test_unsafe_metrics_tokens_are_refused(token, problem):
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None, BETTER_AUTH_SECRET=TEST_SECRET, METRICS_TOKEN=token)
    assert problem in str(refused.value)


def test_metrics_token_defaults_to_off():
    assert Settings(_env_file=None, BETTER_AUTH_SECRET=TEST_SECRET).METRICS_TOKEN == ""


# --- what it reports ----------------------------------------------------------------------------


def test_scrape_is_the_prometheus_text_format_with_every_metric(metrics_client):
    response = metrics_client.get("/metrics", headers=SCRAPE)
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {
        DURATION,
        "todo_auth_failures",
        "todo_db_unavailable",
        "todo_jwks_fetches",
        "db_client_connection_count",
        "db_client_connection_pending_requests",
    } <= names


def test_requests_are_counted_by_method_route_template_and_status(
    metrics_client, scrape, user, auth_headers
):
    api = UserClient(metrics_client, user.id, auth_headers(user))
    task = TaskFactory(user_id=user.id)
    before = scrape()
    for _ in range(3):
        assert api.get(f"/tasks/{task.id}").status_code == 200
    assert api.get("/tasks/999999999").status_code == 404
    assert api.patch(f"/tasks/{task.id}/complete").status_code == 200
    after = metrics_client.get("/metrics", headers=SCRAPE).text
    delta = {key: count - before.get(key, 0.0) for key, count in samples(after).items()}

    def count(method: str, route: str, status: str) -> float:
        labels = {"http_request_method": method, "http_route": route}
        return value(delta, f"{DURATION}_count", **labels, http_response_status_code=status)

    assert count("GET", TASK_ROUTE, "200") == 3
    assert count("GET", TASK_ROUTE, "404") == 1
    assert count("PATCH", TASK_ROUTE + "/complete", "200") == 1
    # Each observation lands in the buckets up to +Inf, and the sum grows by the durations.
    labels = {"http_request_method": "GET", "http_route": TASK_ROUTE}
    plus_inf = value(
        delta, f"{DURATION}_bucket", **labels, http_response_status_code="200", le="+Inf"
    )
    assert plus_inf == 3
    assert value(delta, f"{DURATION}_sum", **labels, http_response_status_code="200") > 0
    assert user.id not in after
    assert str(task.id) not in {label for key in samples(after) for _, label in key[1]}


def test_unmatched_paths_and_unknown_methods_have_fixed_labels(metrics_client, scrape):
    before = scrape()
    assert metrics_client.get("/api/someone/secret-path").status_code == 404
    assert metrics_client.request("BREW", "/health").status_code == 405
    assert metrics_client.request("BREW2", "/health").status_code == 405
    after = scrape()

    def delta(method: str, route: str, status: str) -> float:
        labels = {
            "http_request_method": method,
            "http_route": route,
            "http_response_status_code": status,
        }
        key = (f"{DURATION}_count", frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("GET", "", "404") == 1
    assert delta("_OTHER", "/health", "405") == 2
    assert not any("someone" in label or "BREW" in label for key in after for _, label in key[1])


def test_auth_failures_are_counted_by_reason(scrape, metrics_client, user, other_user, make_token):
    base = f"/api/{user.id}/tasks"
    before = scrape()
    metrics_client.get(base)
    metrics_client.get(base, headers={"Authorization": "Basic abc"})
    metrics_client.get(
        base, headers={"Authorization": f"Bearer {make_token(user, secret='x' * 40)}"}
    )
    metrics_client.get(base, headers={"Authorization": f"Bearer {make_token(user, ttl=-3600)}"})
    metrics_client.get(base, headers={"Authorization": f"Bearer {make_token(other_user)}"})
    metrics_client.get(base, headers={"Authorization": "Bearer not-a-jwt"})
    after = scrape()
    counted = {
        reason: value(after, "todo_auth_failures_total", reason=reason)
        - value(before, "todo_auth_failures_total", reason=reason)
        for reason in (
            "missing_token",
            "invalid_scheme",
            "bad_signature",
            "expired",
            "user_mismatch",
            "malformed_token",
            "invalid_claims",
        )
    }
    assert counted == {
        "missing_token": 1,
        "invalid_scheme": 1,
        "bad_signature": 1,
        "expired": 1,
        "user_mismatch": 1,
        "malformed_token": 1,
        "invalid_claims": 0,
    }


def test_unknown_user_is_counted_as_an_auth_failure(scrape, metrics_client, make_token):
    before = value(scrape(), "todo_auth_failures_total", reason="unknown_user")
    token = make_token("nobody-by-this-id")
    response = metrics_client.post(
        "/api/nobody-by-this-id/tasks",
        json={"title": "x"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 401
    assert value(scrape(), "todo_auth_failures_total", reason="unknown_user") == before + 1


def test_database_unavailable_is_counted(scrape, settings, make_token):
    dead = settings.model_copy(
        update={
            "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none",
            "METRICS_TOKEN": METRICS_TOKEN,
        }
    )
    before = value(scrape(), "todo_db_unavailable_total")
    client = TestClient(create_app(dead))  # no lifespan: it would wait for the database
    response = client.get("/api/u1/tasks", headers={"Authorization": f"Bearer {make_token('u1')}"})
    assert response.status_code == 503
    assert value(scrape(), "todo_db_unavailable_total") == before + 1


def test_database_sessions_are_reported_idle_used_and_waiting(scrape, engine):
    url = engine.url  # TCP, or a Unix socket (the embedded server) named in the query
    pool = f"{url.host or url.query['host']}:{url.port or 5432}/{url.database}"
    scraped = scrape()
    state = {"db_client_connection_pool_name": pool}
    # The test's session is the app's one session; the scrape itself holds none.
    assert (
        value(scraped, "db_client_connection_count", **state, db_client_connection_state="idle")
        == 1
    )
    assert (
        value(scraped, "db_client_connection_count", **state, db_client_connection_state="used")
        == 0
    )
    assert (
        pool_key := ("db_client_connection_pending_requests", frozenset(state.items()))
    ) in scraped
    assert scraped[pool_key] == 0


def test_jwks_fetches_are_counted_by_outcome():
    metrics = enable_metrics()
    assert metrics.registry is not None

    def count(outcome: str) -> float:
        return (
            metrics.registry.get_sample_value("todo_jwks_fetches_total", {"outcome": outcome})
            or 0.0
        )

    def refused(url: str, timeout: float) -> bytes:
        raise ConnectionRefusedError(url)

    fetches: list[Any] = [
        lambda url, timeout: b'{"keys": []}',
        refused,
        lambda url, timeout: b"<html>",
    ]
    before = {outcome: count(outcome) for outcome in ("success", "error", "invalid")}
    for fetch in fetches:
        cache = JwksCache(
            "http://jwks.invalid/", max_age=60, min_interval=1, timeout=1, fetch=fetch
        )
        asyncio.run(cache.refresh_async())
    after = {outcome: count(outcome) - before[outcome] for outcome in before}
    assert after == {"success": 1, "error": 1, "invalid": 1}


# --- where the numbers go -----------------------------------------------------------------------


def test_one_process_counts_in_memory():
    assert enable_metrics().directory is None  # pytest's process: no supervisor, no variable


def test_an_early_import_of_prometheus_client_is_refused(tmp_path):
    # Here prometheus_client counts in memory; a worker that needed files must not start so.
    with pytest.raises(RuntimeError, match="imported before the metrics directory"):
        workers.check_prometheus_client_mode(tmp_path)
    workers.check_prometheus_client_mode(None)


def test_workers_directory_is_private_and_named_for_the_supervisor(tmp_path, monkeypatch):
    monkeypatch.setattr(workers.tempfile, "tempdir", str(tmp_path))
    stopped = tmp_path / f"{workers.OWN_DIRECTORY_PREFIX}999999999-1"
    stopped.mkdir()
    (stopped / "counter_123.db").write_bytes(b"old numbers")
    running = tmp_path / f"{workers.OWN_DIRECTORY_PREFIX}{os.getpid()}-1"
    running.mkdir()
    path = workers._supervisor_directory(os.getppid())
    assert (
        path.name
        == f"{workers.OWN_DIRECTORY_PREFIX}{os.getppid()}-{workers._started_at(os.getppid())}"
    )
    assert workers._started_at(os.getppid()).isdigit()
    assert path.stat().st_mode & 0o777 == 0o700
    assert not stopped.exists()  # its supervisor is gone: a new start begins from zero
    assert running.exists()  # another service still running
    assert workers._supervisor_directory(os.getppid()) == path  # the other workers find it


def test_workers_directory_planted_by_someone_else_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(workers.tempfile, "tempdir", str(tmp_path))
    planted = (
        tmp_path
        / f"{workers.OWN_DIRECTORY_PREFIX}{os.getppid()}-{workers._started_at(os.getppid())}"
    )
    planted.mkdir()
    planted.chmod(0o777)
    with pytest.raises(RuntimeError, match="not a private directory"):
        workers._supervisor_directory(os.getppid())
