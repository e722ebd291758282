"""`CrossOriginMiddleware` answers exactly as Starlette's `CORSMiddleware` with the same options."""

from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from backend.platform.cors import CrossOriginMiddleware

OPTIONS: dict[str, Any] = {
    "allow_origins": ["http://localhost:3000"],
    "allow_methods": ["GET", "POST"],
    "allow_headers": ["Authorization", "Content-Type"],
    "expose_headers": ["X-Request-ID"],
    "max_age": 600,
}
VARY = {"none": [], "one": [("Vary", "Accept")], "two": [("Vary", "Accept"), ("Vary", "Cookie")]}


def _app(middleware: type) -> Starlette:
    async def endpoint(request: Any) -> Response:
        response = Response(b"{}", media_type="application/json")
        for name, value in VARY[request.query_params.get("vary", "none")]:
            response.headers.append(name, value)
        response.headers.append("X-After", "1")
        return response

    return Starlette(
        routes=[Route("/", endpoint, methods=["GET", "POST"])],
        middleware=[Middleware(middleware, **OPTIONS)],
    )


@pytest.mark.parametrize("vary", sorted(VARY))
@pytest.mark.parametrize(
    "method, headers",
    [
        ("GET", {}),
        ("POST", {}),
        ("GET", {"Origin": "http://localhost:3000"}),
        ("GET", {"Origin": "http://evil.example"}),
        (
            "OPTIONS",
            {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"},
        ),
        ("OPTIONS", {"Origin": "http://evil.example", "Access-Control-Request-Method": "PUT"}),
        ("OPTIONS", {}),
    ],
)
def test_the_same_answers_as_starlettes(method: str, headers: dict[str, str], vary: str) -> None:
    ours = TestClient(_app(CrossOriginMiddleware)).request(
        method, f"/?vary={vary}", headers=headers
    )
    theirs = TestClient(_app(CORSMiddleware)).request(method, f"/?vary={vary}", headers=headers)
    assert ours.status_code == theirs.status_code
    assert ours.content == theirs.content
    assert ours.headers.multi_items() == theirs.headers.multi_items()
