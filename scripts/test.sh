#!/usr/bin/env bash
# One command for the tests: set up (venv, dependencies), lint, then run the whole suite against
# real Airflow, real MLflow, real model-server processes and the PostgreSQL on 127.0.0.1:5432.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k cli`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup.sh

echo ">> ruff"
ruff check .
ruff format --check .
echo ">> pytest"
exec python -m pytest -p no:cacheprovider -rs "$@"
