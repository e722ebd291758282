#!/usr/bin/env sh
# Fuzz the running API with schemathesis: a real server on a throwaway database, a real user
# and token, every operation from the live OpenAPI schema (tests/fuzz/__main__.py).
# FUZZ_MAX_TIME=<seconds> (default 120) bounds the run; extra arguments go to `schemathesis run`.
. "$(dirname "$0")/bootstrap.sh"
exec .venv/bin/python -m tests.fuzz "$@"
