#!/usr/bin/env sh
# Install what is needed, then run the whole test suite (or the paths/options given).
. "$(dirname "$0")/bootstrap.sh"
exec .venv/bin/python -m pytest "$@"
