#!/usr/bin/env bash
# One command for the tests: set up (venv, dependencies), lint, then run the whole suite against
# real Airflow, real MLflow, real model-server processes and the PostgreSQL on 127.0.0.1:5432.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k cli`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup.sh

# The browser tests drive Debian's Chromium (never a browser downloaded by Playwright).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo ">> installing chromium (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "!! chromium is missing: run 'sudo apt-get install -y chromium chromium-driver' (browser tests will fail)" >&2
  fi
fi

echo ">> ruff"
ruff check .
ruff format --check .
echo ">> pytest"
# Never the checkout's package: neither pytest (-P) nor any Python it starts puts the current
# directory first on sys.path, so every process imports the installed wheel (conftest.py checks).
export PYTHONSAFEPATH=1
exec python -P -m pytest -p no:cacheprovider -rs "$@"
