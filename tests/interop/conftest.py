"""The production arrangement, for real: a Better Auth server (Node.js, `better-auth` and `pg`
from npm, interop/better-auth/) and the service (uvicorn in its own process) on one PostgreSQL
database, in both start-up orders.

Outside CI these tests skip, saying why, only when Node.js (or, for the browser test, Chromium) is
not installed; with INTEROP_REQUIRED=1 (set by .ci/run) a missing tool is a failure instead.
"""

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from conftest import ROOT, TEST_SECRET, _server_url

NODE_PROJECT = ROOT / "interop" / "better-auth"
CLIENT = ROOT / "clients" / "typescript"
REQUIRED = os.environ.get("INTEROP_REQUIRED") == "1"
ORDERS = ("better-auth-migrates-first", "service-starts-first")
FRONTEND_PORT = 3000  # the frontend's origin in production-like CORS settings


def require_tool(name: str, why: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed: {why}"
        if REQUIRED:
            pytest.fail(f"{message} (INTEROP_REQUIRED=1: CI must not skip)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def node() -> str:
    node = require_tool("node", "the Better Auth interop tests need Node.js 20+")
    if not (NODE_PROJECT / "node_modules" / "better-auth").is_dir():
        npm = require_tool("npm", "installing the Better Auth server's packages needs npm")
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_PROJECT, check=True, timeout=600
        )
    return node


@pytest.fixture(scope="session")
def compiled_client(node: str, tmp_path_factory: Any) -> Path:
    """The TypeScript client compiled with its pinned tsc: its `index.js` (an ES module)."""
    if not (CLIENT / "node_modules" / "typescript").is_dir():
        npm = require_tool("npm", "installing the client's build tools needs npm")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=CLIENT, check=True, timeout=600)
    out = tmp_path_factory.mktemp("client-dist")
    tsc = CLIENT / "node_modules" / "typescript" / "bin" / "tsc"
    subprocess.run(  # noqa: S603 - our own argv
        [node, str(tsc), "--outDir", str(out), "--declaration", "false"],
        cwd=CLIENT,
        check=True,
        timeout=120,
    )
    return out / "index.js"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def claim_frontend_port() -> tuple[int, Any]:
    """Port 3000 when no other test run holds it (a lock held for the whole stack, so that two
    runs at once cannot both pick it), else any free port; the frontend's origin follows it."""
    lock = open(f"/tmp/todo-api-interop-port-{FRONTEND_PORT}.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        return free_port(), None
    if not port_is_free(FRONTEND_PORT):
        lock.close()
        return free_port(), None
    return FRONTEND_PORT, lock


@dataclass
class Process:
    """A child process whose output goes to a file we can read back."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(  # noqa: S603 - our own argv
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    continue
        return lines

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def wait_until_ready(process: Process, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited:\n{process.output()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{process.name} did not answer {url}:\n{process.output()[-3000:]}")


@dataclass
class Stack:
    order: str
    database_url: str
    auth_url: str  # Better Auth's base URL, also the frontend's origin (as with Next.js)
    api_url: str
    better_auth: Process
    service: Process
    other_origin: str
    migration: dict[str, Any] = field(default_factory=dict)

    def sql(self, statement: str, **params: Any) -> list[Any]:
        engine = create_engine(make_url(self.database_url).set(drivername="postgresql+psycopg2"))
        try:
            with engine.begin() as connection:
                result = connection.execute(text(statement), params)
                return list(result) if result.returns_rows else []
        finally:
            engine.dispose()


def _database(server_url: str) -> tuple[str, Any]:
    server = make_url(server_url.replace("postgres://", "postgresql://", 1))
    name = f"todo_interop_{uuid.uuid4().hex[:12]}"
    admin = create_engine(
        server.set(drivername="postgresql+psycopg2"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    return server.set(database=name).render_as_string(hide_password=False), (admin, name)


def _drop_database(handle: Any) -> None:
    admin, name = handle
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _node_database_url(url: str) -> str:
    """node-postgres wants `postgresql://`, and a socket directory as `?host=` works for both."""
    return url.replace("postgresql+psycopg2://", "postgresql://", 1)


@pytest.fixture(scope="package", params=ORDERS)
def stack(
    request: pytest.FixtureRequest, node: str, compiled_client: Path, tmp_path_factory: Any
) -> Iterator[Stack]:
    order = request.param
    logs = tmp_path_factory.mktemp(f"interop-{order}")
    database_url, handle = _database(_server_url())
    auth_port, port_lock = claim_frontend_port()
    other_port, api_port = free_port(), free_port()
    auth_url = f"http://localhost:{auth_port}"
    api_url = f"http://127.0.0.1:{api_port}"
    node_env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "DATABASE_URL": _node_database_url(database_url),
        "BETTER_AUTH_SECRET": TEST_SECRET,
        "BETTER_AUTH_URL": auth_url,
        "PORT": str(auth_port),
        "EXTRA_PORT": str(other_port),
        "API_URL": api_url,
        "CLIENT_JS": str(compiled_client),  # the page imports the TypeScript client from here
    }
    better_auth = Process(
        "better-auth",
        [node, "server.mjs", "serve"],
        node_env,
        NODE_PROJECT,
        logs / "better-auth.log",
    )
    service = Process(
        "service",
        [
            sys.executable,
            "-m",
            "backend",
            "--host",
            "127.0.0.1",
            "--port",
            str(api_port),
            "--no-access-log",
        ],
        {
            "PATH": os.environ.get("PATH", ""),
            "DATABASE_URL": database_url,
            "BETTER_AUTH_SECRET": TEST_SECRET,
            "BETTER_AUTH_URL": auth_url,  # turns on JWKS tokens: {auth_url}/api/auth/jwks
            "CORS_ORIGINS": auth_url,
            "LOG_FORMAT": "json",
            "DB_STARTUP_WAIT_SECONDS": "10",
        },
        ROOT,
        logs / "service.log",
    )
    stack = Stack(
        order,
        database_url,
        auth_url,
        api_url,
        better_auth,
        service,
        other_origin=f"http://localhost:{other_port}",
    )

    def migrate() -> None:
        result = subprocess.run(  # noqa: S603
            [node, "server.mjs", "migrate"],
            cwd=NODE_PROJECT,
            env=node_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, f"Better Auth migration failed:\n{result.stderr}"
        lines = [line for line in result.stdout.splitlines() if line.startswith('{"event":')]
        stack.migration = json.loads(lines[-1])

    def start_service() -> None:
        service.start()
        wait_until_ready(service, f"{api_url}/health")

    def start_better_auth() -> None:
        better_auth.start()
        wait_until_ready(better_auth, f"{auth_url}/api/auth/ok")

    try:
        if order == "better-auth-migrates-first":
            migrate()
            start_better_auth()
            start_service()
        else:
            start_service()  # creates "user" (as Better Auth would) and tasks
            migrate()
            start_better_auth()
        yield stack
    finally:
        for process in (service, better_auth):
            if process.proc is not None:
                process.stop()
        _drop_database(handle)
        if port_lock is not None:
            port_lock.close()


# --- a frontend's view of Better Auth -----------------------------------------------------------


@dataclass
class SignedIn:
    user_id: str
    email: str
    password: str
    cookie: str  # the Cookie header a browser would send back to Better Auth
    session_token: str
    cookie_cache: str  # the better-auth.session_data cookie: token kind 3


class Frontend:
    """What the Next.js app does against Better Auth, over HTTP."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.http = httpx.Client(
            base_url=stack.auth_url, headers={"Origin": stack.auth_url}, timeout=10
        )

    def sign_up(self, name: str) -> SignedIn:
        email = f"{name.lower()}-{uuid.uuid4().hex[:8]}@example.com"
        password = f"pw-{uuid.uuid4().hex}"
        response = self.http.post(
            "/api/auth/sign-up/email", json={"email": email, "password": password, "name": name}
        )
        assert response.status_code == 200, response.text
        return self._signed_in(response, email, password)

    def sign_in(self, account: SignedIn) -> SignedIn:
        response = self.http.post(
            "/api/auth/sign-in/email", json={"email": account.email, "password": account.password}
        )
        assert response.status_code == 200, response.text
        return self._signed_in(response, account.email, account.password)

    def _signed_in(self, response: httpx.Response, email: str, password: str) -> SignedIn:
        self.http.cookies.clear()  # each account's cookies travel explicitly, as `cookie`
        return SignedIn(
            user_id=response.json()["user"]["id"],
            email=email,
            password=password,
            cookie="; ".join(f"{name}={value}" for name, value in response.cookies.items()),
            session_token=response.headers["set-auth-token"],  # the bearer() plugin
            cookie_cache=response.cookies["better-auth.session_data"],
        )

    def token(self, account: SignedIn, kind: str) -> str:
        """Each kind of token the frontend can hold, obtained the way the frontend does."""
        if kind == "cookie-cache":
            return account.cookie_cache
        if kind == "hs256":  # a Next.js route handler signing `sub` with jose
            response = self.http.get("/api/hs256-token", headers={"Cookie": account.cookie})
        elif kind == "jwt-plugin":  # authClient.token() -> GET /api/auth/token
            response = self.http.get("/api/auth/token", headers={"Cookie": account.cookie})
        elif kind == "set-auth-jwt":  # the header on getSession() with the bearer plugin
            response = self.http.get(
                "/api/auth/get-session",
                headers={"Authorization": f"Bearer {account.session_token}"},
            )
            assert response.status_code == 200, response.text
            return response.headers["set-auth-jwt"]
        else:
            raise AssertionError(kind)
        assert response.status_code == 200, response.text
        token: str = response.json()["token"]
        return token

    def delete_user(self, account: SignedIn) -> None:
        response = self.http.post(
            "/api/auth/delete-user",
            json={"password": account.password},
            headers={"Cookie": account.cookie},
        )
        assert response.status_code == 200, response.text


@pytest.fixture
def frontend(stack: Stack) -> Iterator[Frontend]:
    frontend = Frontend(stack)
    yield frontend
    frontend.http.close()
