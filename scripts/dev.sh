#!/usr/bin/env sh
# Install what is needed, then serve the API on an embedded PostgreSQL with a demo user.
. "$(dirname "$0")/bootstrap.sh"
exec .venv/bin/python -m backend.dev "$@"
