"""Time-to-serve benchmark: this provider's deployer against ``mlflow models serve``.

For the same small scikit-learn model (``models:/bench-iris/1``), each side is timed from the start
of the deploy call to the first HTTP 200 answer of ``POST /invocations``:

* provider: ``get_model_deployer().deploy_model(ServiceConfig(...))``, then polling
  ``service.prediction_url`` (the deploy returns after health and a smoke prediction on a private
  socket; the public URL must then answer too). The service is deleted after each run.
* mlflow: ``mlflow models serve --env-manager local`` started as a subprocess, then polling its
  ``/invocations``. Its process group (the CLI and its uvicorn child) is stopped after each run.

Runs are interleaved (the side that goes first alternates) and the median, min and max of each side
are reported as a Markdown table, plus the provider/mlflow ratio of the medians. Everything lives in
a temporary directory (AIRFLOW_HOME, MLflow tracking store and artifacts) removed at the end.

Usage::

    python bench/time_to_serve.py [--runs 5] [--json results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

MODEL_NAME = "bench-iris"
MODEL_URI = f"models:/{MODEL_NAME}/1"
POLL_INTERVAL = 0.05
POLL_TIMEOUT = httpx.Timeout(5.0, connect=1.0)
SERVE_DEADLINE = 600.0  # seconds to wait for a first 200 before declaring a run failed
STOP_GRACE = 5.0
PAYLOAD: dict[str, Any] = {
    "dataframe_split": {
        "columns": ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"],
        "data": [[5.1, 3.5, 1.4, 0.2]],
    }
}


def log(message: str) -> None:
    """Progress goes to stderr so that stdout holds only the result table."""
    print(message, file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def prepare_environment(tmp: Path) -> None:
    """Point Airflow and MLflow at the temp dir. Must run before the provider or mlflow is imported."""
    os.environ["AIRFLOW_HOME"] = str(tmp / "airflow")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    # `mlflow models serve` runs `uvicorn` from PATH: the interpreter's own bin dir goes first.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def register_model(tmp: Path) -> None:
    """Train a LogisticRegression on iris and register it as version 1 of ``bench-iris``."""
    import mlflow
    import mlflow.sklearn
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    X, y = load_iris(return_X_y=True, as_frame=True)
    if list(X.columns) != PAYLOAD["dataframe_split"]["columns"]:
        raise RuntimeError(f"unexpected iris columns: {list(X.columns)}")
    model = LogisticRegression(max_iter=500).fit(X, y)
    experiment_id = mlflow.create_experiment("time-to-serve", artifact_location=(tmp / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment_id):
        mlflow.sklearn.log_model(model, name="model", input_example=X.head(2), registered_model_name=MODEL_NAME)


def wait_for_prediction(
    client: httpx.Client, url: str, check: Callable[[], None] | None = None, deadline: float = SERVE_DEADLINE
) -> None:
    """POST the payload to ``url`` until it answers 200; ``check`` may raise to abort early."""
    end = time.monotonic() + deadline
    last = "no answer"
    while True:
        try:
            answer = client.post(url, json=PAYLOAD)
            if answer.status_code == 200:
                return
            last = f"HTTP {answer.status_code}: {answer.text[:200]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if check is not None:
            check()
        if time.monotonic() > end:
            raise TimeoutError(f"{url} did not answer 200 within {deadline:.0f}s (last: {last})")
        time.sleep(POLL_INTERVAL)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (the OS's ephemeral range, well away from the provider's 5200-5399)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ProviderSide:
    """Deploys with this provider's deployer; deletes every service it created."""

    name = "provider"

    def __init__(self) -> None:
        from airflow_provider_modeldeploy.deployers import get_model_deployer

        self.deployer = get_model_deployer()

    def run(self, client: httpx.Client, model_name: str = MODEL_NAME) -> float:
        from airflow_provider_modeldeploy.deployers import ServiceConfig

        start = time.perf_counter()
        service = self.deployer.deploy_model(ServiceConfig(model_uri=MODEL_URI, model_name=model_name))
        try:
            wait_for_prediction(client, service.prediction_url)
            return time.perf_counter() - start
        finally:
            self.deployer.delete_model_server(service.uuid)  # each run is a fresh deploy

    def close(self) -> None:
        """Force-delete whatever is left: the registry is private to this benchmark's AIRFLOW_HOME."""
        for service in self.deployer.find_model_server():
            try:
                self.deployer.delete_model_server(service.uuid, force=True)
            except Exception as exc:
                log(f"could not delete provider service {service.uuid}: {exc}")


class MlflowSide:
    """Runs ``mlflow models serve`` as a subprocess in its own process group."""

    name = "mlflow"

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def launch(self, workers: int | None = None) -> tuple[subprocess.Popen[bytes], str, Callable[[], None]]:
        """Start ``mlflow models serve`` (``-w workers`` if given) on a free port: the process, its
        prediction URL, and a check that raises with its log's tail once it has exited."""
        port = free_port()
        logfile = self.tmp / f"mlflow-serve-{len(self.procs)}-{port}.log"
        cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", MODEL_URI]
        cmd += ["--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"]
        if workers is not None:
            cmd += ["-w", str(workers)]
        with logfile.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
                start_new_session=True,
            )
        self.procs.append(proc)

        def check() -> None:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited with code {proc.returncode}:\n{tail(logfile)}")

        return proc, f"http://127.0.0.1:{port}/invocations", check

    def run(self, client: httpx.Client) -> float:
        start = time.perf_counter()
        proc, url, check = self.launch()
        try:
            wait_for_prediction(client, url, check)
            return time.perf_counter() - start
        finally:
            self.stop(proc)

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM the whole process group, SIGKILL it after the grace period, reap the CLI."""
        pgid = proc.pid  # start_new_session: the CLI leads its own group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        end = time.monotonic() + STOP_GRACE
        while time.monotonic() < end and group_alive(proc):
            time.sleep(0.05)
        if group_alive(proc):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)


def group_alive(proc: subprocess.Popen[bytes]) -> bool:
    """Whether any process of ``proc``'s group is left (the leader is reaped first, if it exited)."""
    proc.poll()
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


def summarize(times: list[float]) -> dict[str, Any]:
    return {
        "runs": len(times),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
    }


def markdown_table(results: dict[str, dict[str, Any]], ratio: float) -> str:
    rows = [
        "| server | runs | median (s) | min (s) | max (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    labels = {"provider": "modeldeploy provider", "mlflow": "`mlflow models serve`"}
    for key, label in labels.items():
        r = results[key]
        rows.append(f"| {label} | {r['runs']} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} |")
    rows.append("")
    rows.append(f"Ratio of medians provider/mlflow: **{ratio:.2f}**")
    return "\n".join(rows)


def benchmark(runs: int, tmp: Path) -> dict[str, Any]:
    log(f"Registering {MODEL_URI} in {os.environ['MLFLOW_TRACKING_URI']} ...")
    register_model(tmp)
    sides: list[ProviderSide | MlflowSide] = []
    times: dict[str, list[float]] = {"provider": [], "mlflow": []}
    try:
        sides.append(ProviderSide())
        sides.append(MlflowSide(tmp))
        with httpx.Client(timeout=POLL_TIMEOUT) as client:
            for i in range(runs):
                order = sides if i % 2 == 0 else sides[::-1]
                for side in order:
                    elapsed = side.run(client)
                    times[side.name].append(elapsed)
                    log(f"run {i + 1}/{runs} {side.name}: {elapsed:.2f}s")
    finally:
        for side in sides:
            try:
                side.close()
            except Exception as exc:
                log(f"cleanup of {side.name} failed: {exc}")
    results = {name: summarize(values) for name, values in times.items()}
    ratio = results["provider"]["median_s"] / results["mlflow"]["median_s"]
    return {"model_uri": MODEL_URI, "results": results, "ratio_provider_over_mlflow": ratio}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per server (default: 5)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    tmp = Path(tempfile.mkdtemp(prefix="time-to-serve-"))
    try:
        prepare_environment(tmp)
        report = benchmark(args.runs, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(markdown_table(report["results"], report["ratio_provider_over_mlflow"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
