"""What the attack suites share: every task route, the database snapshot they compare before and
after an attack, and reading the `auth.failed` lines the service logs to stdout."""

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlmodel import Session

BODY = {"title": "pwned", "description": "written by an attacker", "completed": True}


@dataclass(frozen=True)
class Route:
    method: str
    template: str  # "{user}" and "{task}" are filled in
    has_body: bool

    def url(self, user_id: str, task_id: int | str) -> str:
        return self.template.format(user=user_id, task=task_id)

    def __str__(self) -> str:
        return f"{self.method} {self.template.replace('/api/{user}/tasks', '') or '/'}"


# All seven route/method pairs, each with a body that would change something if it got through.
ROUTES = [
    Route("POST", "/api/{user}/tasks", True),
    Route("GET", "/api/{user}/tasks", False),
    Route("GET", "/api/{user}/tasks/{task}", False),
    Route("PUT", "/api/{user}/tasks/{task}", True),
    Route("PATCH", "/api/{user}/tasks/{task}", True),
    Route("DELETE", "/api/{user}/tasks/{task}", False),
    Route("PATCH", "/api/{user}/tasks/{task}/complete", False),
]
SINGLE_TASK_ROUTES = [r for r in ROUTES if "{task}" in r.template]


def send(client: Any, route: Route, user_id: str, task_id: int | str, **kwargs: Any) -> Any:
    if route.has_body and "json" not in kwargs and "content" not in kwargs:
        kwargs["json"] = BODY
    return client.request(route.method, route.url(user_id, task_id), **kwargs)


def snapshot(session: Session) -> list[tuple[Any, ...]]:
    """Every row of `tasks` and every user, exactly as stored, read fresh from the database."""
    tasks = session.execute(
        text(
            "SELECT id, user_id, title, description, completed, created_at, updated_at "
            "FROM tasks ORDER BY id"
        )
    ).all()
    users = session.execute(text('SELECT id, name, email FROM "user" ORDER BY id')).all()
    return [tuple(row) for row in tasks] + [("user", *row) for row in users]


def log_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def auth_failures(out: str) -> list[dict[str, Any]]:
    return [line for line in log_lines(out) if line.get("event") == "auth.failed"]


def service_output(out: str) -> str:
    """Captured stdout without the test client's own `httpx` lines (its URL holds the query)."""
    return "\n".join(
        line
        for line in out.splitlines()
        if not (line.startswith("{") and json.loads(line).get("logger") == "httpx")
    )


def token_fragments(token: str) -> list[str]:
    """The token and each of its parts long enough to be recognisable in a log."""
    parts = [token, *token.split("."), *token.split()]
    return [part for part in parts if len(part) >= 8]
