"""The TypeScript client (clients/typescript/), compiled with its pinned tsc, drives the live API
with a Better Auth JWT: all six operations, and each error surfaces as an ApiError."""

import json
import os
import subprocess
from pathlib import Path

from conftest import ROOT
from tests.interop.conftest import Frontend, Stack, require_tool

CLIENT = ROOT / "clients" / "typescript"


def compile_client(node: str, out: Path) -> Path:
    if not (CLIENT / "node_modules" / "typescript").is_dir():
        npm = require_tool("npm", "installing the client's build tools needs npm")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=CLIENT, check=True, timeout=600)
    tsc = CLIENT / "node_modules" / "typescript" / "bin" / "tsc"
    subprocess.run(  # noqa: S603 - our own argv
        [node, str(tsc), "--outDir", str(out), "--declaration", "false"],
        cwd=CLIENT,
        check=True,
        timeout=120,
    )
    return out / "index.js"


def test_the_typescript_client_drives_the_real_api(
    stack: Stack, frontend: Frontend, node: str, tmp_path: Path
):
    client = compile_client(node, tmp_path / "dist")
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
