#!/usr/bin/env bash
# Regenerate the client's inputs from the app, or (--check) fail if they have drifted:
#   openapi.json   = create_app().openapi()              (export_openapi.py)
#   src/schema.ts  = openapi-typescript openapi.json     (pinned in package-lock.json)
# and type-check src/ (the hand-written client derives its types from src/schema.ts, so a schema
# change that breaks its shape fails here). Run without --check after changing the API, and
# commit the result with that change.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
check=false
[ "${1:-}" = "--check" ] && check=true

cd "$here"
[ -d node_modules/openapi-typescript ] || npm ci --no-audit --no-fund
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$python" export_openapi.py > "$work/openapi.json"
npx --no-install openapi-typescript "$work/openapi.json" --output "$work/schema.ts" >/dev/null

if $check; then
  drift=0
  for pair in "openapi.json:$work/openapi.json" "src/schema.ts:$work/schema.ts"; do
    committed="${pair%%:*}" fresh="${pair#*:}"
    if ! diff -u "$committed" "$fresh" > "$work/diff"; then
      echo "clients/typescript/$committed is out of date with the app's OpenAPI schema:" >&2
      head -60 "$work/diff" >&2
      drift=1
    fi
  done
  if [ "$drift" = 1 ]; then
    echo "Run clients/typescript/sync.sh and commit the result with the schema change." >&2
    exit 1
  fi
else
  cp "$work/openapi.json" openapi.json
  cp "$work/schema.ts" src/schema.ts
fi
npx --no-install tsc --noEmit
echo "clients/typescript: in sync with the app's OpenAPI schema, and type-checks"
