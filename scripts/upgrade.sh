#!/usr/bin/env sh
# Take the newest releases pyproject.toml allows: refresh uv.lock to them, install them into
# .venv, then run the whole suite and the oldest-versions run (test-lowest.sh). Review and commit
# the uv.lock diff if both pass. `--upgrade-package NAME` (uv's option) instead upgrades one.
set -e
. "$(dirname "$0")/bootstrap.sh"
if [ $# -eq 0 ]; then set -- --upgrade; fi
.venv/bin/uv lock "$@"
UV_PYTHON_DOWNLOADS=never .venv/bin/uv sync -q --frozen --extra dev --python .venv/bin/python
rm -f .venv/.installed-*
touch ".venv/.installed-$(cat pyproject.toml uv.lock | cksum | cut -d' ' -f1)"
git --no-pager diff --stat -- uv.lock 2>/dev/null || true
.venv/bin/python -m pytest -q -p no:cacheprovider
./scripts/test-lowest.sh -q
