# Sourced by dev.sh, test.sh and fuzz.sh: make .venv and install into it exactly what uv.lock
# pins (the project, editable, with its dev extras), again only when pyproject.toml or uv.lock
# changed. Needs nothing but Python 3.11+: uv itself goes into .venv with pip, at UV_VERSION.
set -e
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
UV_VERSION=0.13.9  # the one CI and the Dockerfile use; raise all three together
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv with $($PYTHON --version)..."
  "$PYTHON" -m venv .venv
fi
if [ "$(.venv/bin/uv --version 2>/dev/null)" != "uv $UV_VERSION" ]; then
  .venv/bin/python -m pip install -q "uv==$UV_VERSION"
fi
stamp=".venv/.installed-$(cat pyproject.toml uv.lock | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  echo "Installing the project and its dev tools into .venv from uv.lock (first run takes a minute)..."
  # --frozen: the lock as it is, never re-resolved here (CI checks it matches pyproject.toml).
  # Exact: a package the lock does not list is removed (uv and pip stay).
  UV_PYTHON_DOWNLOADS=never .venv/bin/uv sync -q --frozen --extra dev --python .venv/bin/python
  rm -f .venv/.installed-*
  touch "$stamp"
fi
