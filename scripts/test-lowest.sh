#!/usr/bin/env sh
# The oldest versions pyproject.toml admits: each direct dependency (and dev tool) at the floor
# of its range (uv's --resolution lowest-direct), installed afresh into .venv-lowest from the
# ranges themselves, then the tests that say the service works there: the OpenAPI contract,
# authentication, other users' tasks out of reach, the database runner and its greenlet bridge,
# the dependency internals we rely on, the migrations, metrics and traces, and one slice end
# to end. A floor that is not true fails here. The locked versions (.venv, uv.lock) run the
# whole suite. Paths/options given replace the default selection; options alone are added to it.
. "$(dirname "$0")/bootstrap.sh"
UV_PYTHON_DOWNLOADS=never .venv/bin/uv venv -q --clear --python .venv/bin/python .venv-lowest
VIRTUAL_ENV=.venv-lowest .venv/bin/uv pip install -q --resolution lowest-direct -e '.[dev]'
VIRTUAL_ENV=.venv-lowest .venv/bin/uv pip list 2>/dev/null \
  | awk 'NR > 2 { printf "%s %s, ", $1, $2 } END { print "" }' | fold -s -w 100
paths_given=no
for arg in "$@"; do case $arg in -*) ;; *) paths_given=yes ;; esac; done
if [ $paths_given = no ]; then
  set -- "$@" tests/test_openapi_client.py tests/test_auth.py tests/test_attack_ownership.py \
    tests/test_attack_tokens.py tests/test_database_runner.py tests/test_greenlet_bridge.py \
    tests/test_dependency_internals.py tests/test_migrations.py tests/test_metrics.py \
    tests/test_tracing.py backend/features/update
fi
exec .venv-lowest/bin/python -m pytest -p no:cacheprovider "$@"
