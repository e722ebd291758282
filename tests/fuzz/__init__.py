"""Schemathesis against the live OpenAPI schema: `./scripts/fuzz.sh` (see `__main__.py`)."""
