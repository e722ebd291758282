"""Print the service's OpenAPI schema (`create_app().openapi()`) as stable, sorted JSON: the
input of the TypeScript client, and the snapshot CI compares against the live app."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backend.main import create_app  # noqa: E402
from backend.platform.config import Settings  # noqa: E402

# The schema does not depend on settings; these only let the app be built (nothing connects).
SETTINGS = Settings(
    _env_file=None,  # type: ignore[call-arg]
    BETTER_AUTH_SECRET="openapi-export-only-0123456789-abcdefghij",
    LOG_FORMAT="console",
)


def openapi_json() -> str:
    return json.dumps(create_app(SETTINGS).openapi(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(openapi_json())
