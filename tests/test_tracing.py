"""Traces of a real uvicorn process, exported by OTLP (HTTP/protobuf) to a receiver the test
runs: one server span per request, a client span per database statement inside it, and the
trace id in the request's log line. Off unless the OTEL_* environment asks for it."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from backend.main import create_app
from backend.platform.config import Settings
from backend.platform.telemetry.tracing import fastapi_telemetry, tracing_requested
from tests.live_server import free_port

ROOT = Path(__file__).resolve().parent.parent
SECRET = "tracing-test-secret-0123456789-abcdefghij"
SERVER, CLIENT = 2, 3  # Span.SpanKind values


class OtlpReceiver:
    """Accepts OTLP/HTTP trace exports on /v1/traces and keeps every span (as dicts)."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.paths: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.paths.append(self.path)
                export = ExportTraceServiceRequest.FromString(body)
                for resource_spans in export.resource_spans:
                    resource = {
                        a.key: a.value.string_value for a in resource_spans.resource.attributes
                    }
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            receiver.spans.append(
                                {
                                    "name": span.name,
                                    "kind": span.kind,
                                    "trace_id": span.trace_id.hex(),
                                    "span_id": span.span_id.hex(),
                                    "parent_span_id": span.parent_span_id.hex(),
                                    "attributes": {
                                        a.key: getattr(a.value, a.value.WhichOneof("value"))
                                        for a in span.attributes
                                    },
                                    "service": resource.get("service.name"),
                                }
                            )
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@contextmanager
def service(
    database_url: str, tmp: Path, **otel: str
) -> Iterator[tuple[str, Callable[[], list[dict[str, Any]]]]]:
    """uvicorn with these OTEL_* variables; yields its URL and a function returning the
    JSON log lines so far (complete once the process has stopped)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FASTAPI_OTEL"))}
    env.update(
        DATABASE_URL=database_url,
        BETTER_AUTH_SECRET=SECRET,
        LOG_FORMAT="json",
        LOG_LEVEL="INFO",
        OTEL_BSP_SCHEDULE_DELAY="50",  # export within 50 ms instead of 5 s
        **otel,
    )
    log_path = tmp / "uvicorn.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "backend", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def lines() -> list[dict[str, Any]]:
            text = log_path.read_text()
            return [json.loads(x) for x in text.splitlines() if x.startswith("{")]

        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.1)
            yield base, lines
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


def test_request_and_statement_spans_reach_the_otlp_receiver(
    database_url, tmp_path, committed_user, make_token
):
    receiver = OtlpReceiver()
    headers = {"Authorization": f"Bearer {make_token(committed_user, secret=SECRET)}"}
    with service(
        database_url,
        tmp_path,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
        OTEL_SERVICE_NAME="todo-test",
    ) as (base, log_lines):
        tasks = f"{base}/api/{committed_user}/tasks"
        task_id = httpx.post(tasks, json={"title": "traced"}, headers=headers).json()["id"]
        response = httpx.get(
            f"{tasks}/{task_id}", headers={**headers, "X-Request-ID": "traced-request-1"}
        )
        assert response.status_code == 200
        deadline = time.monotonic() + 20
        while not any(
            s["attributes"].get("url.path", "").endswith(f"/{task_id}") for s in receiver.spans
        ):
            assert time.monotonic() < deadline, f"no span arrived: {receiver.spans}"
            time.sleep(0.05)
        time.sleep(0.3)  # the statement's span may come in the next batch
    lines = log_lines()

    assert set(receiver.paths) == {"/v1/traces"}
    (request_span,) = [
        s
        for s in receiver.spans
        if s["kind"] == SERVER
        and s["attributes"].get("url.path") == f"/api/{committed_user}/tasks/{task_id}"
    ]
    assert request_span["name"] == "GET /api/{user_id}/tasks/{task_id}"
    assert request_span["service"] == "todo-test"
    assert request_span["attributes"]["http.route"] == "/api/{user_id}/tasks/{task_id}"
    assert request_span["attributes"]["http.response.status_code"] == 200
    assert request_span["parent_span_id"] == ""
    # Its one statement, a child of it; only the request's own spans in its trace.
    in_trace = [s for s in receiver.spans if s["trace_id"] == request_span["trace_id"]]
    (statement,) = [s for s in in_trace if s is not request_span]
    assert statement["kind"] == CLIENT
    assert statement["parent_span_id"] == request_span["span_id"]
    assert statement["name"].startswith("SELECT ")
    assert statement["attributes"]["db.system.name"] == "postgresql"
    assert statement["attributes"]["db.operation.name"] == "SELECT"
    assert "tasks" in statement["attributes"]["db.query.text"]
    assert committed_user not in statement["attributes"]["db.query.text"]  # a placeholder
    # Start-up's statements and the health probes (which query the database) are not traced:
    # every statement span belongs to a request's.
    assert all(s["kind"] in (SERVER, CLIENT) for s in receiver.spans)
    assert not any(s["parent_span_id"] == "" and s["kind"] == CLIENT for s in receiver.spans)
    assert not any(s["attributes"].get("url.path") == "/health" for s in receiver.spans)

    (line,) = [
        x
        for x in lines
        if x.get("event") == "request" and x.get("request_id") == "traced-request-1"
    ]
    assert line["trace_id"] == request_span["trace_id"]
    assert headers["Authorization"].split()[1] not in json.dumps(receiver.spans)


def test_tracing_stays_off_when_the_sdk_is_disabled(
    database_url, tmp_path, committed_user, make_token
):
    receiver = OtlpReceiver()
    headers = {
        "Authorization": f"Bearer {make_token(committed_user, secret=SECRET)}",
        "X-Request-ID": "untraced-1",
    }
    with service(
        database_url, tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_SDK_DISABLED="true"
    ) as (base, log_lines):
        assert httpx.get(f"{base}/api/{committed_user}/tasks", headers=headers).status_code == 200
        time.sleep(0.5)  # five export intervals
    (line,) = [
        x
        for x in log_lines()
        if x.get("event") == "request" and x.get("request_id") == "untraced-1"
    ]
    assert "trace_id" not in line
    assert receiver.spans == []


@pytest.mark.parametrize(
    ("environment", "requested"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, False),  # nowhere to send them
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_tracing_is_asked_for_by_the_standard_variables(monkeypatch, environment, requested):
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert tracing_requested() is requested
    # Not asked for, FastAPI is told so, and does no per-request telemetry of its own.
    assert fastapi_telemetry()["tracing"] is requested
    assert (
        create_app(Settings(_env_file=None, BETTER_AUTH_SECRET=SECRET))._telemetry["tracing"]
        is requested
    )
