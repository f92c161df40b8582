#!/usr/bin/env bash
# One command for the tests: set up (venv, dependencies), lint, then the unit tests (tests/unit: in-process,
# mocked clients, under a minute), then the integration tests (tests/integration: real Airflow, MLflow,
# model-server processes, Chromium, Prometheus, the Kubernetes emulator and the PostgreSQL on 127.0.0.1:5432), these
# in parallel with pytest-xdist. Extra arguments go to both pytest runs, e.g. `bash scripts/test.sh -k cli`;
# MODELDEPLOY_TEST_WORKERS sets the number of integration workers (0: no xdist, one process).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# The browser tests drive Debian's Chromium (never a browser downloaded by Playwright); the Kubernetes
# backends' metrics tests scrape with Debian's Prometheus: its binary, started by the tests per session
# on a free port (tests/integration/prometheus_env.py), never the package's service. Where they are
# missing and apt can install them (as root, as in CI), they are installed while the venv is set up.
APT=()
command -v chromium >/dev/null 2>&1 || APT+=(chromium chromium-driver)
command -v prometheus >/dev/null 2>&1 || APT+=(prometheus)
APT_PID=
if [ "${#APT[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo ">> installing ${APT[*]} (apt, while the venv is set up)"
    APT_LOG="$(mktemp)"
    (
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      if [[ " ${APT[*]} " == *" chromium "* ]]; then apt-get install -y -qq chromium chromium-driver; fi
      if [[ " ${APT[*]} " == *" prometheus "* ]]; then apt-get install -y -qq --no-install-recommends prometheus; fi
    ) >"$APT_LOG" 2>&1 &
    APT_PID=$!
  else
    echo "!! missing ${APT[*]}: run 'sudo apt-get install -y ${APT[*]}' (the browser tests fail, the real-Prometheus tests are skipped)" >&2
  fi
fi
source scripts/setup.sh
if [ -n "$APT_PID" ]; then
  if ! wait "$APT_PID"; then
    cat "$APT_LOG" >&2
    echo "!! apt-get install ${APT[*]} failed" >&2
    exit 1
  fi
  rm -f "$APT_LOG"
  if [[ " ${APT[*]} " == *" prometheus "* ]]; then
    export MODELDEPLOY_TEST_PROMETHEUS=required  # installable here: its tests fail instead of skipping
  fi
fi

echo ">> ruff"
ruff check .
ruff format --check .

# Never the checkout's package: neither pytest (-P) nor any Python it starts puts the current
# directory first on sys.path, so every process imports the installed wheel (tests/installed_wheel.py checks).
export PYTHONSAFEPATH=1
# Integration workers: one more than the CPUs, at least 2. The suite is mostly CPU-bound (other processes
# starting and answering), but part of many tests is waiting (a server's timeout, a poll): on 2 CPUs a
# third worker fills those gaps (446 s against 476 s for 2, run back to back); a fourth only adds
# contention (315 s against 273-288 s for 3, on a faster machine). Each worker has its own
# serving agent, MLflow store, directories and PostgreSQL schemas; tests sharing a module fixture stay
# on one worker (--dist loadgroup).
WORKERS="${MODELDEPLOY_TEST_WORKERS:-$(python -c 'import os; print(max(2, len(os.sched_getaffinity(0)) + 1))')}"
XDIST=(-n "$WORKERS" --dist loadgroup)
# The unit tests on two workers: a few of them wait on real time (a lease's renewal), and one process
# leaves the other CPU idle meanwhile (13 s against 16 s here; more workers cost more than they save).
UNIT_XDIST=(-n 2)
if [ "$WORKERS" = 0 ]; then XDIST=(-p no:xdist); UNIT_XDIST=(-p no:xdist); fi

collected=0
run() {  # pytest; "no tests collected" (5, e.g. -k matching none of one part) is not a failure
  local rc=0
  python -P -m pytest -p no:cacheprovider -rs "$@" || rc=$?
  if [ "$rc" = 5 ]; then return 0; fi
  [ "$rc" = 0 ] && collected=1
  return "$rc"
}
for arg in "$@"; do
  if [ -e "${arg%%::*}" ]; then  # paths given (a file, a directory, a test id): one run of those
    echo ">> pytest"
    run "${XDIST[@]}" "$@"
    exit
  fi
done
echo ">> pytest: unit tests"
run "${UNIT_XDIST[@]}" tests/unit "$@"
echo ">> pytest: integration tests (${WORKERS} workers)"
run "${XDIST[@]}" tests/integration "$@"
if [ "$collected" = 0 ]; then
  echo "!! no test matched: $*" >&2
  exit 5
fi
