"""What both Kubernetes backends' deployers share: exact merge patches, label values, pod readiness,
following pods' logs, and the rule that an object this provider did not create for an endpoint is never changed."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

from airflow_provider_modeldeploy.exceptions import InvalidParameterError

log = logging.getLogger(__name__)

LABEL_PREFIX = "modeldeploy.airflow.apache.org"
MANAGED_LABEL = f"{LABEL_PREFIX}/managed"
SERVICE_LABEL = f"{LABEL_PREFIX}/service-uuid"


def merge_diff(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns ``old`` into exactly ``new``: keys only ``old``
    has are removed (null), changed objects are diffed, anything else is replaced whole."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = (
                merge_diff(old[key], value) if isinstance(value, dict) and isinstance(old[key], dict) else value
            )
    return patch


def restore_patch(current: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """The merge patch putting ``current`` back to ``before``'s labels, annotations and spec exactly,
    guarded by ``current``'s resourceVersion."""
    meta = {"resourceVersion": current["metadata"]["resourceVersion"]}
    for key in ("labels", "annotations"):
        meta[key] = merge_diff(current["metadata"].get(key) or {}, before["metadata"].get(key) or {})
    return {"metadata": meta, "spec": merge_diff(current.get("spec") or {}, before.get("spec") or {})}


def label_value(value: str) -> str:
    """A label value (63 chars of [-A-Za-z0-9_.], alphanumeric at both ends); the annotation keeps
    the exact value."""
    return re.sub(r"[^-A-Za-z0-9_.]", "_", value)[:63].strip("-_.")


def pod_ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))


def owner(obj: dict[str, Any]) -> str | None:
    """The service uuid of an object this provider created (None for anyone else's)."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return labels.get(SERVICE_LABEL) if labels.get(MANAGED_LABEL) == "true" else None


def check_ours(obj: dict[str, Any] | None, owners: set[str], kind: str, namespace: str) -> None:
    """Never take over what we did not create: ``obj`` must carry our managed label and the uuid of
    one of the endpoint's services (``owners``), else an error naming it; it is left as it is."""
    if obj is None:
        return
    labels = (obj.get("metadata") or {}).get("labels") or {}
    if labels.get(MANAGED_LABEL) == "true" and labels.get(SERVICE_LABEL) in owners:
        return
    name = obj["metadata"]["name"]
    why = (
        f"its service uuid {labels.get(SERVICE_LABEL)} is not in the registry; 'airflow served-models sync' adopts it"
        if labels.get(MANAGED_LABEL) == "true"
        else "not created by this provider"
    )
    raise InvalidParameterError(
        "endpoint", name, f"{kind} {namespace}/{name} exists and is not this endpoint's ({why}); it was left as it "
        "is: choose another endpoint name",
    )  # fmt: skip


def follow_logs(open_stream: Callable[[str], Any], pods: list[str], prefix: bool) -> Iterator[str]:
    """One streaming log request per pod (``open_stream(pod)``: the kubernetes client's ``follow=True``
    response, not preloaded), read by a thread each into one queue, so that a quiet pod holds up no
    other; ends when every stream ends (the pods went away) or the caller stops."""
    import queue
    import threading

    from kubernetes.client.exceptions import ApiException
    from kubernetes.watch.watch import iter_resp_lines

    from airflow_provider_modeldeploy.hooks.kubernetes_cluster import api_message

    lines: queue.Queue[str | None] = queue.Queue()
    streams = []
    for pod in pods:
        try:
            stream = open_stream(pod)
        except ApiException as exc:
            log.warning("No log from pod %s: HTTP %s: %s", pod, exc.status, api_message(exc))
            continue
        streams.append(stream)

        def pump(stream: Any = stream, pod: str = pod) -> None:
            try:
                for line in iter_resp_lines(stream):
                    lines.put(f"[{pod}] {line}" if prefix else line)
            except Exception as exc:  # the connection shut down under us (we stopped) or broke
                log.debug("Log stream of pod %s ended: %s", pod, exc)
            finally:
                lines.put(None)

        threading.Thread(target=pump, name=f"log-{pod}", daemon=True).start()
    try:
        running = len(streams)
        while running:
            try:
                line = lines.get(timeout=0.5)  # wakes up for Ctrl-C
            except queue.Empty:
                continue
            if line is None:
                running -= 1
            else:
                yield line
    finally:
        for stream in streams:  # unblocks the threads' reads: they end, the connections close
            with contextlib.suppress(Exception):
                stream.shutdown()
            with contextlib.suppress(Exception):
                stream.release_conn()


#: Per backend: the counters read (requests by status and version, latency buckets by ``le`` and
#: version), the selector (``{namespace}``, ``{name}`` filled in), and the unit of ``le``.
#:
#: * Seldon Core 1's executor (seldon-core v1.18.2, executor/api/metric/constants.go, server.go,
#:   rest/server.go): ``seldon_api_executor_server_requests_seconds`` (seconds) labelled
#:   deployment_name (the SeldonDeployment), predictor_name, predictor_version, service, method, code;
#:   ``service="predictions"`` only: the executor counts its health checks (``status``) and metadata
#:   calls in the same histogram. ``namespace`` is Prometheus' (a PodMonitor's relabelling).
#: * Knative's queue-proxy in front of a KServe predictor in Knative mode (knative/serving up to
#:   knative-v1.18, pkg/queue/request_metric.go; 1.19 moved to OpenTelemetry's ``kn.*`` names):
#:   ``revision_app_request_count`` and ``revision_app_request_latencies`` (milliseconds) labelled
#:   namespace_name, configuration_name (``<isvc>-predictor``), revision_name, response_code_class...
#:   The queue-proxy knows no routes: health checks through the ingress count as requests.
PROMQL: dict[str, dict[str, Any]] = {
    "seldon": {
        "selector": 'namespace="{namespace}",deployment_name="{name}",service="predictions"',
        "requests": ("seldon_api_executor_server_requests_seconds_count", "code, predictor_name"),
        "buckets": ("seldon_api_executor_server_requests_seconds_bucket", "le, predictor_name"),
        "status": "code", "version": "predictor_name", "le_scale": 1.0,
    },
    "kserve": {
        "selector": 'namespace_name="{namespace}",configuration_name=~"{name}-predictor.*"',
        "requests": ("revision_app_request_count", "response_code_class, revision_name"),
        "buckets": ("revision_app_request_latencies_bucket", "le, revision_name"),
        "status": "response_code_class", "version": "revision_name", "le_scale": 0.001,  # milliseconds
    },
}  # fmt: skip
#: How far back a counter's last sample is looked for: Prometheus' own lookback delta (5 minutes), or
#: the step if longer. The last step ends in the future (the step in progress): at that end, a 5-minute
#: lookback of a 15-minute step would find none of the step's samples for its first 10 minutes.
LOOKBACK_SECONDS = 300


def increase_query(metric: str, by: str, selector: str, step: int) -> str:
    """PromQL for the exact increase of the counters ``metric{selector}`` in each ``step`` seconds up
    to the evaluation time, summed by ``by``: the last sample minus the last sample a step earlier,
    per series; a series with no sample a step earlier (it appeared since: a new pod, or a status or
    bucket met for the first time) counts its whole value (counters start at 0), and so does one
    whose value fell (a restarted container: counted since its restart).

    Not ``increase()``: it only sees what changes *between* samples inside its range, so a series'
    first scraped value is lost (the first requests of each pod and status code: a single error is
    never shown), the gap between two steps' ranges is lost, and the rest is extrapolated to the
    range's edges: on a real Prometheus, 61 Seldon predictions read as 65 and their 8 errors as 7,
    a deploy's lone smoke prediction as none. These steps add up to exactly what the pods counted (``last_over_time`` also skips the staleness markers a
    failed scrape leaves, which would count a series' whole value again)."""
    lookback = max(LOOKBACK_SECONDS, step)
    now = f"last_over_time({metric}{{{selector}}}[{lookback}s])"
    before = f"last_over_time({metric}{{{selector}}}[{lookback}s] offset {step}s)"
    return f"sum by ({by}) (({now} - {before}) >= 0 or {now})"


def by_predictor_name(version: str) -> str:
    """Seldon's role of a predictor: the canary predictor is named so; the rest is main."""
    return "canary" if "canary" in version else "main"


def kubernetes_metrics(
    deployer: Any, record: Any, window: str, namespace: str,
    roles: Callable[[], Callable[[str], str]] = lambda: by_predictor_name,
) -> Any:  # fmt: skip
    """A Kubernetes service's metrics from the Prometheus its connection names (``prometheus_url``);
    without one, not available, saying what to configure. ``roles()``: how a series' version label (a
    Seldon predictor, a Knative revision) maps to main, canary or previous; asked only once Prometheus has
    answered (it may read the cluster: not for a connection that has no metrics source)."""
    from airflow_provider_modeldeploy.hooks.prometheus import PrometheusClient, PrometheusError
    from airflow_provider_modeldeploy.metrics import ServiceMetrics, build, window_bounds

    url = (deployer.hook.extras or {}).get("prometheus_url")
    if not url:
        return ServiceMetrics.unavailable(
            record.uuid, window,
            f"no metrics source: connection {deployer.conn_id or deployer.hook.default_conn_name!r} has no "
            f"prometheus_url extra; set it to a Prometheus that scrapes the {deployer.backend} predictor pods",
        )  # fmt: skip
    if deployer.backend == "kserve" and deployer.settings.deployment_mode != "Knative":
        return ServiceMetrics.unavailable(
            record.uuid, window,
            f"no metrics source: connection {deployer.conn_id or deployer.hook.default_conn_name!r} deploys in KServe's "
            f"{deployer.settings.deployment_mode} mode, which runs no Knative queue-proxy (the source of KServe's "
            "request metrics read here); deployment_mode Knative has them",
        )  # fmt: skip
    promql = PROMQL[deployer.backend]
    start, end, step = window_bounds(window)
    selector = promql["selector"].format(namespace=namespace, name=record.endpoint)
    client = PrometheusClient(str(url))
    slices: list[dict[str, Any]] = []
    try:
        for kind in ("requests", "buckets"):
            query = increase_query(*promql[kind], selector=selector, step=step)
            for series in client.query_range(query, start + step, end, step):
                labels = series.get("metric") or {}
                if kind == "requests":
                    status = str(labels.get(promql["status"], ""))
                    name = f"requests:{status[:1]}xx" if status[:1].isdigit() else "requests:other"
                else:
                    le = labels.get("le", "+Inf")
                    name = f"bucket:{le if le == '+Inf' else float(le) * promql['le_scale']}"
                version = str(labels.get(promql["version"], ""))
                for at, value in series.get("values") or []:
                    number = float(value)
                    if number == number and number > 0:  # not NaN: the step had samples
                        slices.append({"t": float(at) - step, "model_version": version, "series": {name: number}})
    except PrometheusError as exc:
        return ServiceMetrics.unavailable(record.uuid, window, str(exc))
    return build(
        record.uuid, window, slices, source="prometheus", events=deployer._chart_history(record),
        role_of=roles(),
    )  # fmt: skip
