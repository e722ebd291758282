"""A real browser (Debian's Chromium, headless): the frontend's page signs in with Better Auth and
calls the API with the TypeScript client and a bearer token, preflight included, the way
lib/api.ts does (Idempotency-Key, If-Match and If-None-Match sent, ETag and Idempotent-Replayed
read, all through CORS); the same page served from another origin is refused by CORS."""

import json
import os
import subprocess

import httpx
import pytest

from tests.interop.conftest import NODE_PROJECT, Frontend, Stack, require_tool


@pytest.fixture(scope="session")
def chromium() -> str:
    path = os.environ.get("CHROMIUM_PATH") or require_tool(
        "chromium", "the browser test needs Debian's Chromium (apt-get install -y chromium)"
    )
    return path


def open_page(node: str, chromium: str, url: str) -> dict:
    result = subprocess.run(  # noqa: S603 - our own argv
        [node, "browser.mjs", url, "20000"],
        cwd=NODE_PROJECT,
        env={
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/tmp"),
            "CHROMIUM_PATH": chromium,
        },
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, f"browser run failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def request_lines(stack: Stack, method: str, path: str) -> list[dict]:
    return [
        line
        for line in stack.service.log_lines()
        if line.get("event") == "request" and line["method"] == method and line["path"] == path
    ]


def test_the_frontend_page_calls_the_api_from_the_browser(
    stack: Stack, frontend: Frontend, node: str, chromium: str
):
    account = frontend.sign_up("Browser")
    url = f"{stack.auth_url}/#email={account.email}&password={account.password}"

    result = open_page(node, chromium, url)

    assert result["ok"], result
    assert result["origin"] == stack.auth_url
    assert result["userId"] == account.user_id
    # Through CORS: the page sent Idempotency-Key, If-Match and If-None-Match, and read the
    # ETag and Idempotent-Replayed headers of the answers.
    assert result["created"] == {
        "title": f"from {stack.auth_url}",
        "etag": '"1"',
        "replayed": False,
    }
    assert result["retried"] == {"sameId": True, "replayed": True}
    assert result["listed"] == [f"from {stack.auth_url}"]
    assert result["listUnchanged"] is True
    assert result["edited"] == {"title": "edited", "etag": '"2"'}
    assert result["stale"] == 412
    assert result["getUnchanged"] is True
    path = f"/api/{account.user_id}/tasks"
    # The bearer header made the browser ask first: preflights, answered for our origin.
    preflights = request_lines(stack, "OPTIONS", path)
    assert preflights and {line["status"] for line in preflights} == {200}
    assert [line["status"] for line in request_lines(stack, "POST", path)] == [201, 201]
    assert [line["status"] for line in request_lines(stack, "GET", path)] == [200, 304]


def test_the_same_page_from_another_origin_is_refused_by_cors(
    stack: Stack, frontend: Frontend, node: str, chromium: str
):
    account = frontend.sign_up("Elsewhere")
    token = frontend.token(account, "jwt-plugin")
    url = f"{stack.other_origin}/#user={account.user_id}&token={token}"

    result = open_page(node, chromium, url)

    assert result == {
        "ok": False,
        "error": "TypeError: Failed to fetch",
        "console": result["console"],
    }
    path = f"/api/{account.user_id}/tasks"
    preflights = request_lines(stack, "OPTIONS", path)
    # Origin not allowed; the client took the refusal for a network failure and tried again
    # (the page allows two tries), with the same outcome.
    assert [line["status"] for line in preflights] == [400, 400]
    assert request_lines(stack, "POST", path) == []  # the browser never sent the request
    tasks = httpx.get(
        f"{stack.api_url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert tasks.json() == []
