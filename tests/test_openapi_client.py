"""The TypeScript client (clients/typescript/) is generated from the app's OpenAPI schema: its
snapshot must be the schema the app serves now, so that a schema change and the client's update
land in the same commit. (.ci/run also regenerates src/schema.ts from it and type-checks.)"""

import importlib.util
import json

from conftest import ROOT

CLIENT = ROOT / "clients" / "typescript"


def _export_module():
    spec = importlib.util.spec_from_file_location("export_openapi", CLIENT / "export_openapi.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_typescript_client_is_generated_from_the_current_schema():
    fresh = _export_module().openapi_json()
    committed = (CLIENT / "openapi.json").read_text()
    assert json.loads(committed) == json.loads(fresh), (
        "The OpenAPI schema changed: run clients/typescript/sync.sh and commit "
        "clients/typescript/openapi.json and src/schema.ts with the change."
    )
    assert committed == fresh  # byte for byte: sorted keys, two-space indent


def test_the_snapshot_covers_every_route():
    schema = json.loads((CLIENT / "openapi.json").read_text())
    operations = {
        (method.upper(), path) for path, item in schema["paths"].items() for method in item
    }
    assert operations == {
        ("GET", "/api/{user_id}/tasks"),
        ("POST", "/api/{user_id}/tasks"),
        ("GET", "/api/{user_id}/tasks/{task_id}"),
        ("PUT", "/api/{user_id}/tasks/{task_id}"),
        ("PATCH", "/api/{user_id}/tasks/{task_id}"),
        ("DELETE", "/api/{user_id}/tasks/{task_id}"),
        ("PATCH", "/api/{user_id}/tasks/{task_id}/complete"),
        ("GET", "/health"),
    }
