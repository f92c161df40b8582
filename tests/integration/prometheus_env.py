"""A real Prometheus for the tests (Debian's ``prometheus`` package, 2.42; scripts/test.sh installs
it): the binary itself, started once per test session (per xdist worker) on a free port with a
config and a storage directory of its own, stopped by pid at the end. Never Debian's service.

What it scrapes: the emulator's pods (``Prometheus.watch(cluster)``), found through a file_sd file the
emulator keeps, each target carrying the ``__meta_kubernetes_*`` labels kubernetes_sd (role pod) would
give it; the scrape jobs relabel them exactly as the Prometheus Operator's config for these
PodMonitors does (``generatePodMonitorConfig``: keep by pod label and port name; ``namespace``,
``container``, ``pod`` from the pod; ``job`` = ``<monitor namespace>/<monitor name>``; ``endpoint`` =
the port name), so series carry the labels they carry in a kube-prometheus set-up:

* ``seldon-monitoring/seldon-podmonitor``: the PodMonitor Seldon Core documents (seldon-core v1.18.2,
  doc/source/analytics/analytics.md): pods labelled ``app.kubernetes.io/managed-by: seldon-core``,
  port ``metrics``, path ``/prometheus``. (A ServiceMonitor would add a ``service`` target label, the
  Kubernetes Service's name, and rename the executor's own ``service`` to ``exported_service``.)
* ``monitoring/knative-queue-proxy``: a PodMonitor for Knative revisions' queue-proxy (Knative ships
  none for user pods): pods with a ``serving.knative.dev/revision`` label, port ``http-usermetric``
  (9091), path ``/metrics``.

A 1 s scrape interval: the tests poll with a deadline instead of sleeping.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from local_http import HTTP

INSTALL_HINT = "run 'sudo apt-get install -y prometheus' (scripts/test.sh installs it when run as root)"


def _pod_monitor(name: str, keep: list[tuple[str, str]], port: str, path: str) -> dict[str, Any]:
    """The scrape job the Prometheus Operator generates for PodMonitor ``name`` ("<ns>/<name>")
    selecting pods by ``keep`` (label name, regex) on container port ``port``."""
    relabel: list[dict[str, Any]] = [{"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"}]
    for label, regex in keep:
        sanitized = "".join(c if c.isalnum() or c == "_" else "_" for c in label)
        relabel.append({
            "action": "keep", "regex": f"{regex};true",
            "source_labels": [f"__meta_kubernetes_pod_label_{sanitized}", f"__meta_kubernetes_pod_labelpresent_{sanitized}"],
        })  # fmt: skip
    relabel += [
        {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": port},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"target_label": "job", "replacement": name},
        {"target_label": "endpoint", "replacement": port},
    ]
    return {"job_name": f"podMonitor/{name}/0", "honor_labels": False, "metrics_path": path,
            "file_sd_configs": [{"files": ["sd/*.json"]}], "relabel_configs": relabel}  # fmt: skip


CONFIG = {
    "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
    "scrape_configs": [
        _pod_monitor("seldon-monitoring/seldon-podmonitor", [("app.kubernetes.io/managed-by", "(seldon-core)")],
                     "metrics", "/prometheus"),
        _pod_monitor("monitoring/knative-queue-proxy", [("serving.knative.dev/revision", "(.+)")],
                     "http-usermetric", "/metrics"),
    ],
}  # fmt: skip


@dataclass
class Prometheus:
    url: str
    workdir: Path

    def watch(self, cluster: Any) -> None:
        """Scrape the emulated ``cluster``'s pods (the emulator keeps a file_sd file for it)."""
        assert cluster.emulated, "a real cluster is scraped by its own Prometheus"
        target = self.workdir / "sd" / f"emulator-{cluster.emulator_url.rsplit(':', 1)[1]}.json"
        HTTP.post(f"{cluster.emulator_url}/emulator/prometheus-sd", json={"file": str(target)},
                   timeout=10).raise_for_status()  # fmt: skip

    def query(self, promql: str) -> list[dict[str, Any]]:
        answer = HTTP.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        answer.raise_for_status()
        return answer.json()["data"]["result"]

    def scraped_since(self, since: float, selector: str, targets: int = 1) -> bool:
        """Whether every target matching ``selector`` (on ``up``), at least ``targets`` of them (a new
        pod is a target only once Prometheus read the file_sd file again), was scraped successfully after
        ``since`` (a scrape's timestamp is its start: what was answered before ``since`` is in it; a
        failed scrape, ``up`` 0, does not count)."""
        found = self.query(f"timestamp(up{{{selector}}}) and up{{{selector}}} == 1")
        return len(found) >= targets and all(float(s["value"][1]) > since for s in found)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def binary() -> str | None:
    return shutil.which("prometheus") or next((p for p in ("/usr/bin/prometheus",) if os.access(p, os.X_OK)), None)


@contextlib.contextmanager
def running_prometheus(workdir: Path) -> Iterator[Prometheus]:
    """The real Prometheus in ``workdir`` (config, storage, file_sd directory, log), stopped by pid."""
    import yaml

    path = binary()
    assert path, f"prometheus is not installed: {INSTALL_HINT}"
    (workdir / "sd").mkdir(parents=True)
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    log_path = workdir / "prometheus.log"
    for _attempt in range(3):  # the free port may be taken between the check and the bind
        port = _free_port()
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [path, "--config.file=prometheus.yml", "--storage.tsdb.path=data",
                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=2h", "--log.level=warn"],
                cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        ready = False
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if HTTP.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    ready = True
                    break
            time.sleep(0.05)
        if ready:
            break
        _stop(proc)
    else:
        raise AssertionError(f"prometheus did not start:\n{log_path.read_text()[-3000:]}")
    try:
        yield Prometheus(url=url, workdir=workdir)
    finally:
        _stop(proc)
        shutil.rmtree(workdir / "data", ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)


def dump(prometheus: Prometheus) -> str:
    """The targets as Prometheus sees them, for a failure message."""
    try:
        active = HTTP.get(f"{prometheus.url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return f"(targets unreadable: {exc})"
    return json.dumps([{k: t.get(k) for k in ("labels", "health", "lastError", "lastScrape")} for t in active])


@dataclass
class Traffic:
    """What a test sent: each request's status, and the slowest answer's seconds (client side: an
    upper bound of what the server measured)."""

    statuses: list[int]
    slowest: float


def send(url: str, bodies: list[Any], clients: int = 4) -> Traffic:
    """POST each of ``bodies`` to ``url``, ``clients`` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    def post(client: httpx.Client, body: Any) -> tuple[int, float]:
        began = time.perf_counter()
        status = client.post(url, json=body).status_code
        return status, time.perf_counter() - began

    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda body: post(client, body), bodies))
    return Traffic([status for status, _ in answers], max(seconds for _, seconds in answers))


def after_a_scrape(prometheus: Prometheus, selector: str, read: Any, timeout: float = 30, targets: int = 1) -> Any:
    """``read()`` once Prometheus scraped every target of ``selector`` (``targets`` of them at least)
    after now (what the pods counted until now is then in its TSDB): polled with a deadline, never a
    fixed sleep."""
    since = time.time()
    deadline = time.monotonic() + timeout
    while not prometheus.scraped_since(since, selector, targets):
        assert time.monotonic() < deadline, f"no scrape of {selector} after {since}: {dump(prometheus)}"
        time.sleep(0.1)
    return read()
