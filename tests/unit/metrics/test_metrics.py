"""The metrics result: Prometheus' histogram_quantile, counter resets, every step present, and the
Kubernetes backends' "not available" reason."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest

from airflow_provider_modeldeploy.metrics import build, histogram_quantile, window_bounds
from airflow_provider_modeldeploy.serving.metrics_store import MetricsStore, increases, parse

INF = math.inf
# (le, cumulative count): 10 under 5 ms, 50 under 10 ms, 90 under 100 ms, 100 in all
BUCKETS = [(0.005, 10.0), (0.01, 50.0), (0.1, 90.0), (INF, 100.0)]


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        (0.5, 0.01 + (0.1 - 0.01) * 0 / 40),  # rank 50: exactly the 0.01 bucket's top
        (0.05, 0.0025),  # rank 5 in the first bucket, from 0: 0 + 0.005 * 5/10
        (0.3, 0.0075),  # rank 30: 0.005 + 0.005 * 20/40
        (0.7, 0.055),  # rank 70: 0.01 + 0.09 * 20/40
        (0.95, 0.1),  # rank 95 falls in +Inf: the highest finite bound
        (0.0, 0.0),
    ],
)
def test_histogram_quantile_interpolates_as_prometheus(q: float, expected: float) -> None:
    assert histogram_quantile(q, BUCKETS) == pytest.approx(expected)


def test_histogram_quantile_edge_cases() -> None:
    assert histogram_quantile(0.5, [(0.1, 0.0), (INF, 0.0)]) is None  # no observations: NaN
    assert histogram_quantile(0.5, [(0.1, 3.0)]) is None  # no +Inf bucket
    assert histogram_quantile(-1, BUCKETS) == -INF and histogram_quantile(2, BUCKETS) == INF
    # unsorted, duplicate bounds merged, a non-monotonic count evened out
    assert histogram_quantile(0.3, [(INF, 100.0), (0.01, 50.0), (0.005, 10.0), (0.1, 45.0), (0.1, 45.0)]) == (
        pytest.approx(0.0075)
    )


def test_increases_handle_counter_resets_like_increase() -> None:
    before = {("1", "requests:2xx"): 100.0, ("1", "rows"): 40.0}
    now = {("1", "requests:2xx"): 130.0, ("1", "rows"): 5.0, ("1", "requests:5xx"): 2.0, ("1", "in_flight"): 3.0}
    assert increases(now, before) == {
        ("1", "requests:2xx"): 30.0,  # rose
        ("1", "rows"): 5.0,  # fell: a reset, it counted up from zero
        ("1", "requests:5xx"): 2.0,  # new series
        ("1", "in_flight"): 3.0,  # a gauge, as read
    }
    assert increases({("1", "rows"): 7.0}, None) == {("1", "rows"): 7.0}


def test_store_adds_increases_per_minute_and_restarts_count_from_zero(tmp_path: Path) -> None:
    store = MetricsStore(tmp_path / "metrics.db")
    assert oct((tmp_path / "metrics.db").stat().st_mode & 0o777) == "0o600"
    uuid = "0" * 8 + "-0000-4000-8000-000000000001"
    store.add(uuid, "pid1", {("1", "requests:2xx"): 10.0}, at=6000.0, baseline=False)  # new server: all 10
    store.add(uuid, "pid1", {("1", "requests:2xx"): 25.0}, at=6030.0, baseline=False)  # +15, same minute
    store.add(uuid, "pid2", {("1", "requests:2xx"): 4.0}, at=6070.0, baseline=False)  # restarted: +4
    points = store.query(uuid, 5900, 6200)
    assert [(p["t"], p["series"]["requests:2xx"]) for p in points] == [(6000, 25.0), (6060, 4.0)]
    adopted = "0" * 8 + "-0000-4000-8000-000000000002"
    store.add(adopted, "pid9", {("1", "requests:2xx"): 500.0}, at=6000.0, baseline=True)  # before we watched
    store.add(adopted, "pid9", {("1", "requests:2xx"): 503.0}, at=6015.0, baseline=True)
    assert [p["series"] for p in store.query(adopted, 5900, 6200)] == [{"requests:2xx": 3.0}]


def test_parse_reads_a_server_page() -> None:
    page = (
        'modeldeploy_requests_total{model_version="3",status_class="2xx"} 7.0\n'
        'modeldeploy_request_duration_seconds_bucket{le="0.005",model_version="3"} 6.0\n'
        'modeldeploy_request_duration_seconds_bucket{le="+Inf",model_version="3"} 7.0\n'
        'modeldeploy_request_duration_seconds_sum{model_version="3"} 0.02\n'
        'modeldeploy_requests_in_flight{model_version="3"} 1.0\n'
        'python_gc_objects_collected_total{generation="0"} 5.0\n'
    )
    assert parse(page) == {
        ("3", "requests:2xx"): 7.0, ("3", "bucket:0.005"): 6.0, ("3", "bucket:+Inf"): 7.0, ("3", "sum"): 0.02,
        ("3", "in_flight"): 1.0,
    }  # fmt: skip


def test_build_fills_every_step_and_computes_the_summary() -> None:
    now = 7200.0 + 30  # 02:00:30
    start, end, step = window_bounds("1h", now)
    assert (start, end, step) == (3660, 7260, 60)
    slices = [
        {"t": 7200, "model_version": "2", "series": {"requests:2xx": 190, "requests:4xx": 6, "requests:5xx": 4,
         "bucket:0.005": 10, "bucket:0.01": 50, "bucket:0.1": 90, "bucket:+Inf": 100, "rows": 380, "in_flight": 1}},
        {"t": 5000, "model_version": "1", "series": {"requests:2xx": 0}},
        {"t": 100, "model_version": "1", "series": {"requests:2xx": 99}},  # before the window: left out
    ]  # fmt: skip
    history = [
        {"action": "replace", "outcome": "success", "created_at": "1970-01-01T01:50:00+00:00",
         "details": {"model_version": "2"}},
        {"action": "rollback", "outcome": "failed", "created_at": "1970-01-01T01:55:00+00:00", "details": {}},
    ]  # fmt: skip
    result = build("u", "1h", slices, source="serving-agent", role_of=lambda v: "main" if v == "2" else "previous",
                   events=history, now=now)  # fmt: skip
    assert result.available and [v.model_version for v in result.versions] == ["2", "1"]
    main, previous = result.versions
    assert previous.role == "previous" and len(main.points) == len(previous.points) == 60
    assert all(p.requests == 0 and p.p95_ms is None for p in main.points[:-1])  # real zeros, present
    last = main.points[-1]
    assert (last.requests, last.errors, last.client_errors, last.server_errors, last.rows) == (200, 10, 6, 4, 380)
    assert last.p50_ms == pytest.approx(10.0) and last.p95_ms == pytest.approx(100.0)
    s = result.summary
    assert (s.requests, s.errors, s.error_rate, s.in_flight) == (200, 10, 0.05, 1)
    assert s.requests_per_minute == pytest.approx(200 / 60, abs=0.001)
    assert [(e.action, e.model_version) for e in result.events] == [("replace", "2")]
    data = result.to_dict()
    assert data["start"] == "1970-01-01T01:01:00+00:00" and "totals" not in data
    empty = build("u", "1h", [], source="serving-agent", role_of=str, now=now)
    assert empty.summary.error_rate is None and empty.summary.in_flight is None and len(empty.totals) == 60


@pytest.mark.parametrize("backend", ["seldon", "kserve"])
def test_kubernetes_without_prometheus_is_unavailable_naming_the_connection(backend: str) -> None:
    from airflow_provider_modeldeploy.deployers.kubernetes_common import kubernetes_metrics

    deployer = mock.Mock(conn_id="k8s_prod", backend=backend)
    deployer.hook.extras = {"namespace": "models"}
    record = mock.Mock(uuid="u", endpoint="iris")
    result = kubernetes_metrics(deployer, record, "1h", "models")
    assert not result.available and result.versions == [] and result.summary.requests == 0
    assert "connection 'k8s_prod' has no prometheus_url extra" in result.reason and backend in result.reason


def test_kubernetes_reads_the_connections_prometheus(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_modeldeploy.deployers import kubernetes_common
    from airflow_provider_modeldeploy.hooks import prometheus

    asked: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        query = request.url.params["query"]
        asked.append(query)
        t = float(request.url.params["end"])
        if "count" in query:
            result = [
                {"metric": {"code": "200", "predictor_name": "default"}, "values": [[t, "190"]]},
                {"metric": {"code": "500", "predictor_name": "default"}, "values": [[t, "10"]]},
            ]
        else:
            result = [{"metric": {"le": le, "predictor_name": "default"}, "values": [[t, v]]}
                      for le, v in (("0.01", "100"), ("+Inf", "200"))]  # fmt: skip
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "matrix", "result": result}})

    real = prometheus.PrometheusClient
    monkeypatch.setattr(
        prometheus, "PrometheusClient", lambda url: real(url, transport=httpx.MockTransport(answer), attempts=1)
    )
    deployer = mock.Mock(conn_id="k8s", backend="seldon")
    deployer.hook.extras = {"prometheus_url": "http://prom:9090"}
    deployer._chart_history.return_value = []
    result = kubernetes_common.kubernetes_metrics(deployer, mock.Mock(uuid="u", endpoint="iris"), "1h", "models")
    assert result.available and result.source == "prometheus"
    assert (result.summary.requests, result.summary.errors) == (200, 10)
    assert result.summary.p50_ms == pytest.approx(10.0)
    # Exact per-step increases of the executor's prediction counters (not increase(): see increase_query).
    assert asked[0] == (
        "sum by (code, predictor_name) ((last_over_time(seldon_api_executor_server_requests_seconds_count"
        '{namespace="models",deployment_name="iris",service="predictions"}[300s]) - '
        "last_over_time(seldon_api_executor_server_requests_seconds_count"
        '{namespace="models",deployment_name="iris",service="predictions"}[300s] offset 60s)) >= 0 or '
        "last_over_time(seldon_api_executor_server_requests_seconds_count"
        '{namespace="models",deployment_name="iris",service="predictions"}[300s]))'
    )
    # A day's 15-minute steps look back a whole step: the last one ends in the future, and 5 minutes
    # before that end hold none of its samples for its first 10 minutes.
    assert "[900s])" in kubernetes_common.increase_query("m", "code", 'a="b"', 900)


def test_kubernetes_prometheus_failure_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_modeldeploy.deployers import kubernetes_common
    from airflow_provider_modeldeploy.hooks import prometheus

    real = prometheus.PrometheusClient
    down = httpx.MockTransport(lambda request: httpx.Response(503, text="overloaded"))
    monkeypatch.setattr(prometheus, "PrometheusClient", lambda url: real(url, transport=down, attempts=1))
    deployer = mock.Mock(conn_id="k8s", backend="kserve")
    deployer.hook.extras = {"prometheus_url": "http://prom:9090"}
    deployer.settings.deployment_mode = "Knative"
    result: Any = kubernetes_common.kubernetes_metrics(deployer, mock.Mock(uuid="u", endpoint="iris"), "1d", "ns")
    assert not result.available and "HTTP 503" in result.reason and result.step_seconds == 900


def test_kserve_standard_mode_has_no_queue_proxy_metrics() -> None:
    """KServe's Standard (RawDeployment) mode runs no Knative queue-proxy: not available, saying so
    (never the zeros an empty Prometheus answer would make)."""
    from airflow_provider_modeldeploy.deployers import kubernetes_common

    deployer = mock.Mock(conn_id="kserve_prod", backend="kserve")
    deployer.hook.extras = {"prometheus_url": "http://prom:9090"}
    deployer.settings.deployment_mode = "Standard"
    result = kubernetes_common.kubernetes_metrics(deployer, mock.Mock(uuid="u", endpoint="iris"), "1h", "ns")
    assert not result.available and result.summary.requests == 0
    assert "connection 'kserve_prod' deploys in KServe's Standard mode, which runs no Knative queue-proxy" in (
        result.reason
    )
