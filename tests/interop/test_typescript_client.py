"""The TypeScript client (clients/typescript/), compiled with its pinned tsc, drives the live API
with a Better Auth JWT: all six operations, each error surfaces as an ApiError, writes whose
answers are lost or refused with a 503 are retried with their Idempotency-Key and happen once,
and ETags serve If-Match and conditional reads."""

import json
import os
import subprocess
from pathlib import Path

from tests.interop.conftest import Frontend, Stack


def test_the_typescript_client_drives_the_real_api(
    stack: Stack, frontend: Frontend, node: str, compiled_client: Path
):
    client = compiled_client
    account = frontend.sign_up("Client")
    token = frontend.token(account, "jwt-plugin")
    result = subprocess.run(  # noqa: S603
        [
            node,
            str(Path(__file__).parent / "client_smoke.mjs"),
            client.as_uri(),
            stack.api_url,
            account.user_id,
            token,
        ],
        env={"PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])

    created = seen["created"]
    assert (created["title"], created["user_id"], created["completed"]) == (
        "from the TS client",
        account.user_id,
        False,
    )
    assert seen["listed"] == [created]
    assert seen["pending"] == [created]
    assert seen["got"] == created
    assert (seen["replaced"]["title"], seen["replaced"]["description"]) == ("replaced", "d")
    assert seen["updated"]["description"] is None
    assert seen["toggled"]["completed"] is True
    assert seen["deleted"]["id"] == created["id"]
    assert seen["missing"] == {
        "isApiError": True,
        "status": 404,
        "detail": "Task not found",
        "problems": [],
        "requestId": True,
    }
    assert seen["invalid"]["status"] == 422
    assert seen["invalid"]["problems"] == [["body", "title"]]
    assert seen["forbidden"]["status"] == 403
    assert seen["unauthenticated"]["status"] == 401
    assert seen["unauthenticated"]["detail"] == "Malformed token"

    # Writes whose answers were lost, and a 503: retried with their key, each happened once.
    retried = seen["retried"]
    assert (retried["replayed"], retried["etag"]) == (True, '"1"')
    assert retried["titles"] == ["once, despite a lost answer"]
    assert retried["toggled"] == {"completed": True, "replayed": True}
    assert retried["deleted"] == {"id": True, "replayed": True}
    assert (retried["keys"], retried["distinctKeys"]) == (7, 3)  # 2 + 2 + (503, lost, replay)
    assert retried["left"] == []

    # Concurrent edits and conditional reads.
    assert seen["etags"] == {"created": '"1"', "got": '"1"', "afterEdit": '"2"'}
    assert seen["stale"] == {
        "status": 412,
        "detail": "The task has changed since the ETag in If-Match was read; "
        "get it again and retry",
    }
    assert seen["sameWhileUnchanged"] is True
    assert seen["listSameWhileUnchanged"] is True
    assert seen["afterToggle"] == {"same": False, "completed": True, "etag": '"3"'}
    assert seen["listAfterToggle"] is False
