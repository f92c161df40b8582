"""Metrics from real traffic: a deployed local model server gets 200 prediction requests, 10 of them
bad; its /metrics page, the serving agent's series, the deployer's result, the Served Models API of a
real ``airflow api-server`` and ``airflow served-models describe`` must all say 200 requests, 10
errors, an error rate of 5 %."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import IRIS_COLUMNS, iris_payload, run_airflow, wait_for
from local_http import HTTP
from ui_helpers import running_api_server, ui_environment

GOOD, BAD = 190, 10


def _metrics_dirs(uuid: str) -> list[Path]:
    run_dir = Path(os.environ["AIRFLOW__MODELDEPLOY__RUNTIME_DIR"])
    return sorted(run_dir.glob(f"{uuid.replace('-', '')}-*.metrics"))


@pytest.fixture(scope="module")
def traffic(
    tmp_path_factory: pytest.TempPathFactory, mlflow_models: dict[str, Any], airflow_db_template: Path
) -> Iterator[dict[str, Any]]:
    """An api-server on a registry with one deployed iris service that got 200 requests (10 bad)."""
    from airflow_provider_modeldeploy.deployers import get_model_deployer
    from airflow_provider_modeldeploy.hooks.serving_agent import local_agent
    from airflow_provider_modeldeploy.services import ServiceConfig

    home = tmp_path_factory.mktemp("metrics") / "airflow"
    url = f"sqlite:///{home / 'modeldeploy' / 'registry.db'}"
    with (
        ui_environment(home, url, _MODELDEPLOY_NO_METASTORE="1"),
        running_api_server(home, template=airflow_db_template) as server,
        contextlib.ExitStack() as stack,
    ):
        deployer = get_model_deployer()
        service = deployer.deploy_model(
            ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris", endpoint="iris-metrics", workers=2)
        )
        stack.callback(deployer.delete_model_server, service.uuid)
        records = {"dataframe_records": [dict(zip(IRIS_COLUMNS, [5.1, 3.5, 1.4, 0.2], strict=True))] * 2}
        bad = {"dataframe_split": {"columns": ["no such column", *IRIS_COLUMNS[1:]], "data": [[1, 2, 3, 4]]}}
        statuses: list[int] = []
        with httpx.Client(timeout=30) as client:
            for i in range(GOOD + BAD):
                if i % 20 == 7:
                    body: Any = bad
                elif i % 3 == 0:
                    body = records  # the fast path; the others: dataframe_split, also fast
                elif i % 3 == 1:
                    body = {**iris_payload(), "params": {}}  # not the fast path's: MLflow's app, pandas
                else:
                    body = iris_payload()
                statuses.append(client.post(service.prediction_url, json=body).status_code)
            # A request is recorded once its answer is sent: the client may be quicker than the worker.
            page = wait_for(
                lambda: (
                    (p := client.get(service.prediction_url.replace("/invocations", "/metrics")))
                    and f'_count{{model_version="1"}} {float(GOOD + BAD)}' in p.text
                    and p
                ),
                10,
                "all 200 requests on /metrics",
            )
        assert statuses.count(200) == GOOD and statuses.count(400) == BAD, statuses
        dirs = _metrics_dirs(service.uuid)
        assert local_agent(start=False).sample_metrics() >= 1
        yield {"server": server, "home": home, "deployer": deployer, "service": service, "page": page, "dirs": dirs}


def test_the_metrics_page_is_prometheus_text(traffic: dict[str, Any]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    page = traffic["page"]
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain; version=")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(page.text)
        for s in family.samples
    }
    assert samples[("modeldeploy_requests_total", (("model_version", "1"), ("status_class", "2xx")))] == GOOD
    assert samples[("modeldeploy_requests_total", (("model_version", "1"), ("status_class", "4xx")))] == BAD
    assert samples[("modeldeploy_request_duration_seconds_count", (("model_version", "1"),))] == GOOD + BAD
    assert samples[("modeldeploy_payload_rows_total", (("model_version", "1"),))] == GOOD * 2
    assert samples[("modeldeploy_requests_in_flight", (("model_version", "1"),))] == 0


def test_each_server_generation_has_a_private_directory(traffic: dict[str, Any]) -> None:
    [directory] = traffic["dirs"]
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = list(directory.iterdir())
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files), files


def test_the_deployer_reports_the_traffic(traffic: dict[str, Any]) -> None:
    result = traffic["deployer"].metrics(traffic["service"].uuid, "1h")
    summary = result.summary
    assert result.available and result.source == "serving-agent" and result.reason is None
    assert (summary.requests, summary.errors, summary.error_rate, summary.rows) == (GOOD + BAD, BAD, 0.05, GOOD * 2)
    assert 0 < summary.p50_ms <= summary.p95_ms <= summary.p99_ms
    assert summary.in_flight == 0 and summary.requests_per_minute == pytest.approx((GOOD + BAD) / 60, abs=0.01)
    [version] = result.versions
    assert version.model_version == "1" and version.role == "main" and len(version.points) == 60
    assert sum(p.requests for p in version.points) == GOOD + BAD
    assert sum(p.client_errors for p in version.points) == BAD
    assert [e.action for e in result.events] == ["deploy"] and result.events[0].model_version == "1"


def test_the_plugin_api_reports_the_traffic(traffic: dict[str, Any]) -> None:
    uuid = traffic["service"].uuid
    with traffic["server"].client("admin") as client:
        answer = client.get(f"/api/services/{uuid}/metrics", params={"window": "1h"})
        assert answer.status_code == 200, answer.text
        data = answer.json()
        assert data["available"] and data["window"] == "1h" and data["step_seconds"] == 60
        summary = data["summary"]
        assert (summary["requests"], summary["errors"], summary["error_rate"]) == (GOOD + BAD, BAD, 0.05)
        assert summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"] and summary["rows"] == GOOD * 2
        points = data["versions"][0]["points"]
        assert len(points) == 60 and sum(p["errors"] for p in points) == BAD
        day = client.get(f"/api/services/{uuid}/metrics", params={"window": "1d"}).json()
        assert day["step_seconds"] == 900 and len(day["versions"][0]["points"]) == 96
        assert day["summary"]["requests"] == GOOD + BAD
        assert client.get(f"/api/services/{uuid}/metrics", params={"window": "2h"}).status_code == 422
        lines = client.get("/api/metrics/sparklines", params=[("uuid", uuid), ("uuid", "0" * 8)]).json()
        assert list(lines["services"]) == [uuid]
        spark = lines["services"][uuid]
        assert spark["available"] and len(spark["requests_per_minute"]) == 60 and len(spark["p95_ms"]) == 60
        assert sum(spark["requests_per_minute"]) == GOOD + BAD
        schema = client.get("/api/openapi.json").json()
        assert "/api/services/{uuid}/metrics" in schema["paths"] and "/api/metrics/sparklines" in schema["paths"]
        assert "ServiceMetricsModel" in schema["components"]["schemas"]


def test_describe_shows_the_last_hour(traffic: dict[str, Any]) -> None:
    uuid = traffic["service"].uuid
    env = {k: os.environ[k] for k in ("AIRFLOW__MODELDEPLOY__REGISTRY_SQL_ALCHEMY_CONN", "_MODELDEPLOY_NO_METASTORE")}
    done = run_airflow(traffic["home"], "served-models", "describe", uuid, **env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "5.00% (10 errors)" in done.stdout and "requests per minute" in done.stdout, done.stdout
    done = run_airflow(traffic["home"], "served-models", "describe", uuid, "-o", "json", **env)
    [data] = json.loads(done.stdout)
    assert data["metrics"]["requests"] == str(GOOD + BAD) and data["metrics"]["error_rate"] == "0.05"


def test_the_directory_goes_with_the_server(traffic: dict[str, Any]) -> None:
    from airflow_provider_modeldeploy.deployers import get_model_deployer
    from airflow_provider_modeldeploy.services import ServiceConfig

    deployer = get_model_deployer()
    service = deployer.deploy_model(
        ServiceConfig(model_uri="models:/iris/2", model_name="iris", endpoint="iris-metrics-gone")
    )
    assert len(_metrics_dirs(service.uuid)) == 1
    deployer.delete_model_server(service.uuid)
    assert _metrics_dirs(service.uuid) == []
    off = deployer.deploy_model(
        ServiceConfig(model_uri="models:/iris/2", model_name="iris", endpoint="iris-metrics-off", metrics=False)
    )
    try:
        assert _metrics_dirs(off.uuid) == []
        assert HTTP.get(off.prediction_url.replace("/invocations", "/metrics"), timeout=10).status_code == 404
        result = deployer.metrics(off.uuid, "1h")
        assert not result.available and "metrics=false" in result.reason
    finally:
        deployer.delete_model_server(off.uuid)
