"""FastAPI behaviour the service leans on for speed beyond its documented guarantees, pinned.

`mount_routes` (backend/main.py) serves each slice's routes from the app's own route list
instead of `include_router`, which relies on APIRouter having baked the prefix, tags, error
responses and route class into each route when it was declared. `AuthenticatedRoute` relies on
FastAPI building a route's handler through `APIRoute.get_route_handler`. If a FastAPI release
changes either, these tests say so by name, before a request can be served wrongly; then fix
`mount_routes`/`AuthenticatedRoute` or cap `fastapi` in pyproject.toml below that release.
`DirectRoute` reads FastAPI's analysis of each endpoint (`Dependant`, `ModelField.validate`);
tests/test_direct_route.py compares its answers with FastAPI's own handler's.
"""

import dataclasses

import fastapi
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from backend.features.create.router import router as create_router
from backend.features.delete.router import router as delete_router
from backend.features.get.router import router as get_router
from backend.features.list.router import router as list_router
from backend.features.task_model import TasksRoute
from backend.features.toggle.router import router as toggle_router
from backend.features.update.router import router as update_router
from backend.platform import direct_route

SLICES = (create_router, list_router, get_router, update_router, delete_router, toggle_router)
INCOMPATIBLE = f"FastAPI {fastapi.__version__} changed what mount_routes relies on: "


def test_slice_routes_carry_their_prefix_and_route_class():
    for router in SLICES:
        for route in router.routes:
            assert isinstance(route, APIRoute), INCOMPATIBLE + f"{route!r} is not an APIRoute"
            assert route.path.startswith("/api/{user_id}/tasks"), (
                INCOMPATIBLE + f"the router's prefix is not in the route's path: {route.path}"
            )
            assert type(route) is TasksRoute, (
                INCOMPATIBLE + f"{route.path} is a {type(route).__name__}, not a TasksRoute"
            )


def test_the_app_serves_and_documents_each_slice_route_as_declared(app):
    """Mounted as they are, each route keeps its path, methods and class, and appears once in
    the OpenAPI schema (whose every detail tests/test_openapi_client.py compares with the
    committed snapshot). `include_router` is no yardstick here: before FastAPI's included
    routers became layers (0.16x) it declared each route again, through the route class."""
    declared = {
        (route.path, method, type(route))
        for router in SLICES
        for route in router.routes
        for method in route.methods
    }
    served = {
        (route.path, method, type(route))
        for route in app.routes
        if isinstance(route, APIRoute) and route.path.startswith("/api/")
        for method in route.methods
    }
    assert served == declared, INCOMPATIBLE + f"served {served ^ declared} differently"
    documented = {
        (path, method.upper())
        for path, operations in app.openapi()["paths"].items()
        if path.startswith("/api/")
        for method in operations
    }
    assert documented == {(path, method) for path, method, _ in declared}, INCOMPATIBLE + (
        "the OpenAPI schema does not list exactly the slices' routes"
    )


def test_the_route_class_authenticates_before_the_body_is_read(client, user):
    """FastAPI parses a body before any dependency runs: only `get_route_handler` comes first."""
    response = client.post(
        f"/api/{user.id}/tasks",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 401, (
        f"FastAPI {fastapi.__version__} no longer builds the route's handler through "
        f"AuthenticatedRoute.get_route_handler: {response.status_code} {response.text}"
    )


def test_what_the_direct_route_reads_from_fastapi_is_still_there():
    """`DirectCall.of` (backend/platform/direct_route.py) reads FastAPI's analysis of each
    endpoint from `route.dependant` and validates values with its `ModelField`s; a release that
    renames or reshapes these would otherwise leave a route served on guesses."""
    fields = {field.name for field in dataclasses.fields(Dependant)}
    read = {
        "path_params",
        "query_params",
        "header_params",
        "cookie_params",
        "body_params",
        "dependencies",
        "name",
        "call",
        "request_param_name",
        "own_oauth_scopes",
        "parent_oauth_scopes",
        *direct_route._UNSUPPORTED_PARAMETERS,
    }
    assert read <= fields, INCOMPATIBLE + f"Dependant lost {read - fields}"
    route = next(r for r in get_router.routes if isinstance(r, APIRoute))
    (task_id,) = route.dependant.path_params
    assert (task_id.name, task_id.alias) == ("task_id", "task_id"), INCOMPATIBLE + "path field"
    assert task_id.validate("42", {}, loc=()) == (42, []), INCOMPATIBLE + "ModelField.validate"
    value, errors = task_id.validate("0", {}, loc=())
    assert errors and errors[0]["type"] == "greater_than_equal", INCOMPATIBLE + repr(errors)
    assert hasattr(route, "_embed_body_fields"), INCOMPATIBLE + "APIRoute._embed_body_fields"
