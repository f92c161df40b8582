#!/usr/bin/env bash
# Creates (or refreshes) the project's virtualenv in .venv with everything the example and the
# tests need. Sourced by run-example.sh and test.sh; safe to run again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MODELDEPLOY_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"Python >= 3.11 is needed, this is {sys.version.split()[0]}")
PY
if [ ! -x "$VENV/bin/python" ]; then
  echo ">> creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# uv resolves Airflow's and MLflow's dependency trees in seconds where pip may backtrack for minutes.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "uv>=0.4"
echo ">> installing airflow-provider-modeldeploy and its dependencies (Airflow 3.3.2, MLflow 3)"
# --compile-bytecode: as pip does, and unlike uv by default. Where PYTHONDONTWRITEBYTECODE is set
# (this machine sets it), nothing else ever writes the .pyc files, and every airflow command and
# model server would compile Airflow, MLflow and pandas from source again at each start.
# The package is installed from a wheel built here, as users install it (not -e): a file missing from
# the wheel fails here and in the tests, not only on users' machines.
WHEELS="$(mktemp -d)"
"$VENV/bin/python" -m uv build --quiet --wheel --out-dir "$WHEELS" "$ROOT"
WHEEL="$(ls "$WHEELS"/airflow_provider_modeldeploy-*.whl)"
"$VENV/bin/python" -m uv pip install --quiet --compile-bytecode --python "$VENV/bin/python" \
  --reinstall-package airflow-provider-modeldeploy "apache-airflow==3.3.2" "$WHEEL[test,postgres,examples]"
rm -rf "$WHEELS" "$ROOT/build" "$ROOT"/*.egg-info
export PATH="$VENV/bin:$PATH"
