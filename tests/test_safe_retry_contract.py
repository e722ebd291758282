"""What browsers and generated clients see of safe retries and conditional requests: CORS lets
the headers through both ways, and the OpenAPI schema documents them and their answers."""

from typing import Any

import pytest

ORIGIN = "http://localhost:3000"


def test_cors_preflight_allows_the_retry_and_condition_headers(client, user):
    response = client.options(
        f"/api/{user.id}/tasks/1",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": (
                "authorization,idempotency-key,if-match,if-none-match"
            ),
        },
    )
    assert response.status_code == 200
    allowed = {
        h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")
    }
    assert {"idempotency-key", "if-match", "if-none-match"} <= allowed


def test_cors_exposes_the_etag_and_the_replay_marker(api):
    response = api.post(
        "/tasks", json={"title": "x"}, headers={"Origin": ORIGIN, "Idempotency-Key": "cors"}
    )
    assert response.status_code == 201
    exposed = {
        h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")
    }
    assert {"etag", "idempotent-replayed"} <= exposed


@pytest.fixture(scope="module")
def schema(app: Any) -> dict[str, Any]:
    return app.openapi()  # type: ignore[no-any-return]


OPERATIONS = {
    ("post", "/api/{user_id}/tasks"): ({"Idempotency-Key"}, "201", {"400", "409", "422"}),
    ("put", "/api/{user_id}/tasks/{task_id}"): (
        {"Idempotency-Key", "If-Match"},
        "200",
        {"400", "409", "412", "422"},
    ),
    ("patch", "/api/{user_id}/tasks/{task_id}"): (
        {"Idempotency-Key", "If-Match"},
        "200",
        {"400", "409", "412", "422"},
    ),
    ("patch", "/api/{user_id}/tasks/{task_id}/complete"): (
        {"Idempotency-Key", "If-Match"},
        "200",
        {"400", "409", "412", "422"},
    ),
    ("delete", "/api/{user_id}/tasks/{task_id}"): (
        {"Idempotency-Key", "If-Match"},
        "200",
        {"400", "409", "412", "422"},
    ),
    ("get", "/api/{user_id}/tasks/{task_id}"): ({"If-None-Match"}, "200", {"304"}),
    ("get", "/api/{user_id}/tasks"): ({"If-None-Match"}, "200", {"304"}),
}


@pytest.mark.parametrize(("method", "path"), sorted(OPERATIONS))
def test_openapi_documents_the_headers_and_their_answers(schema, method, path):
    headers, success, answers = OPERATIONS[(method, path)]
    operation = schema["paths"][path][method]
    documented = {p["name"] for p in operation["parameters"] if p["in"] == "header"}
    assert documented == headers
    assert answers <= set(operation["responses"])
    response_headers = set(operation["responses"][success]["headers"])
    expected = {"ETag", "Idempotent-Replayed"} if "Idempotency-Key" in headers else {"ETag"}
    assert response_headers == expected
    for code in answers - {"304", "422"}:
        assert operation["responses"][code]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorDetail"
        }
    assert "content" not in operation["responses"].get("304", {})


def test_openapi_states_what_a_key_may_be(schema):
    (key,) = [
        p
        for p in schema["paths"]["/api/{user_id}/tasks"]["post"]["parameters"]
        if p["name"] == "Idempotency-Key"
    ]
    assert key["schema"] == {
        "type": "string",
        "minLength": 1,
        "maxLength": 255,
        "pattern": "^[\\x21-\\x7e]+$",
    }
    assert key["required"] is False
