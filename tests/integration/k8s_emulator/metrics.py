"""The metrics endpoints of the emulated pods, counting the requests the emulator's ingress really
answers, with their upstream counterparts' exact names, labels, units and bucket bounds:

* Seldon Core 1's executor (the ``seldon-container-engine`` container of every model pod): the
  histogram ``seldon_api_executor_server_requests_seconds`` on port ``metrics`` at ``/prometheus``.
  seldonio/seldon-core tag v1.18.2: executor/api/metric/constants.go (the name, the label names
  ``deployment_name, predictor_name, predictor_version, service, method, code``, ``DefBuckets``
  0.005 ... 10 s), executor/api/metric/server.go (``NewServerMetrics``: a HistogramVec of those
  labels) and executor/api/rest/server.go (``wrapMetrics``: promhttp.InstrumentHandlerDuration with
  deployment_name = the SeldonDeployment, predictor_name, predictor_version = the predictor's
  ``version`` annotation, service ``predictions`` / ``status`` / ``metadata`` / ``feedback`` by
  route; ``/ready``, ``/live`` and unknown routes are not instrumented; promhttp (client_golang
  v1.16.0) labels ``method`` lower-case and ``code`` as the status number). The executor's
  ``_summary`` twin, client histograms and Go runtime metrics are not emulated.
* Knative's queue-proxy in front of a KServe predictor in Knative (Serverless) mode, port
  ``http-usermetric`` (9091) at ``/metrics``: ``revision_app_request_count`` (counter) and
  ``revision_app_request_latencies`` (histogram in milliseconds, whole ms: ``latency.Milliseconds()``),
  and the proxy's own ``revision_request_count`` / ``revision_request_latencies`` (with
  ``route_tag``). knative/serving tag knative-v1.18.0 (the last release exporting these
  OpenCensus names; 1.19 moved to OpenTelemetry's ``kn.*`` names): pkg/queue/request_metric.go
  (measures, ``defaultLatencyDistribution`` 5 ... 100000 ms, tag keys pod, container, response_code,
  response_code_class [, route_tag]; probes are not counted), pkg/metrics/key.go and tags.go (label
  names, resource labels namespace_name, service_name, configuration_name, revision_name; container
  ``queue-proxy``; class ``<code/100>xx``), pkg/queue/sharedmain/main.go (exporter component
  ``revision``, hence the ``revision_`` prefix; port ``networking.UserQueueMetricsPort`` 9091).
  Standard (RawDeployment) mode has no queue-proxy, so no such endpoint.

Both render the text exposition format as Go's client libraries do (labels sorted by name, ``le``
last, floats in Go's shortest form: ``le="0.005"``, ``le="5"``).
"""

from __future__ import annotations

import contextlib
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: executor/api/metric/constants.go, v1.18.2
SELDON_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
SELDON_METRIC = "seldon_api_executor_server_requests_seconds"
#: pkg/queue/request_metric.go defaultLatencyDistribution, knative-v1.18.0 (milliseconds)
KNATIVE_BUCKETS = (5, 10, 20, 40, 60, 80, 100, 150, 200, 250, 300, 350, 400, 450, 500, 600, 700, 800, 900, 1000,
                   2000, 5000, 10000, 20000, 50000, 100000)  # fmt: skip


def go_float(value: float) -> str:
    """``value`` as Go's ``strconv.FormatFloat(v, 'g', -1, 64)`` writes it (client_golang's text
    format): the shortest digits, in exponent form when the exponent is < -4 or >= 6 (1e+06)."""
    from decimal import Decimal

    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    sign, digits, exponent = Decimal(repr(float(value))).normalize().as_tuple()
    mantissa, exp = "".join(map(str, digits)), len(digits) + int(exponent) - 1
    if exp < -4 or exp >= 6:
        text = (
            mantissa[0]
            + ("." + mantissa[1:] if len(mantissa) > 1 else "")
            + f"e{'-' if exp < 0 else '+'}{abs(exp):02d}"
        )
    elif exp < 0:
        text = "0." + "0" * (-exp - 1) + mantissa
    else:
        text = mantissa[: exp + 1].ljust(exp + 1, "0") + ("." + mantissa[exp + 1 :] if len(mantissa) > exp + 1 else "")
    return ("-" if sign else "") + text


def _labels(labels: dict[str, str], le: str | None = None) -> str:
    pairs = [f'{k}="{v}"' for k, v in sorted(labels.items())]
    if le is not None:
        pairs.append(f'le="{le}"')
    return "{" + ",".join(pairs) + "}"


class Histogram:
    """A Prometheus histogram vector: per label set, cumulative bucket counts, sum and count."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self.series: dict[tuple[tuple[str, str], ...], list[float]] = {}  # labels -> [bucket counts..., sum, count]

    def observe(self, labels: dict[str, str], value: float) -> None:
        key = tuple(sorted(labels.items()))
        row = self.series.setdefault(key, [0.0] * (len(self.buckets) + 2))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                row[i] += 1
        row[-2] += value
        row[-1] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, row in sorted(self.series.items()):
            labels = dict(key)
            for i, bound in enumerate(self.buckets):
                lines.append(f"{self.name}_bucket{_labels(labels, go_float(bound))} {go_float(row[i])}")
            lines.append(f"{self.name}_bucket{_labels(labels, '+Inf')} {go_float(row[-1])}")
            lines.append(f"{self.name}_sum{_labels(labels)} {go_float(row[-2])}")
            lines.append(f"{self.name}_count{_labels(labels)} {go_float(row[-1])}")
        return lines


class Counter:
    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        self.series: dict[tuple[tuple[str, str], ...], float] = {}

    def inc(self, labels: dict[str, str]) -> None:
        key = tuple(sorted(labels.items()))
        self.series[key] = self.series.get(key, 0.0) + 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(dict(key))} {go_float(v)}" for key, v in sorted(self.series.items())]
        return lines


class MetricsEndpoint:
    """One container's metrics port: a real HTTP server (127.0.0.1, a port of its own) answering
    ``path`` with the families' text, as Prometheus scrapes it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.families: list[Histogram | Counter] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                found = self.path.split("?")[0] == endpoint.path
                data = endpoint.text().encode() if found else b"404 page not found\n"
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        self.thread.start()

    def text(self) -> str:
        with self.lock:
            return "\n".join(line for family in self.families if family.series for line in family.render()) + "\n"

    def close(self) -> None:
        """Stop answering (in the background: ``shutdown`` waits for the serving loop's next poll)."""

        def stop() -> None:
            with contextlib.suppress(Exception):
                self.httpd.shutdown()
                self.httpd.server_close()

        threading.Thread(target=stop, daemon=True).start()


class SeldonExecutorMetrics(MetricsEndpoint):
    """The executor's server histogram (see the module docstring)."""

    def __init__(self, deployment_name: str, predictor_name: str, predictor_version: str) -> None:
        super().__init__("/prometheus")
        self.curried = {"deployment_name": deployment_name, "predictor_name": predictor_name,
                        "predictor_version": predictor_version}  # fmt: skip
        self.histogram = Histogram(SELDON_METRIC, "A histogram of latencies for executor server", SELDON_BUCKETS)
        self.families = [self.histogram]

    def observe(self, service: str, method: str, code: int, seconds: float) -> None:
        labels = {**self.curried, "service": service, "method": method.lower(), "code": str(code)}
        with self.lock:
            self.histogram.observe(labels, seconds)


def executor_service(protocol: str, method: str, route: str) -> str | None:
    """The ``service`` label executor/api/rest/server.go (v1.18.2) gives the route ``route`` of the
    deployment's protocol (``seldon`` or ``v2``), None where the executor does not instrument it
    (``/ready``, ``/live``, unknown routes, a method the route does not take: mux answers those)."""
    import re

    if protocol == "seldon":
        if method == "POST" and route in ("api/v1.0/predictions", "api/v0.1/predictions"):
            return "predictions"
        if method == "POST" and route in ("api/v1.0/feedback", "api/v0.1/feedback"):
            return "feedback"
        if method == "GET" and (
            route in ("api/v1.0/health/status", "api/v1.0/status")
            or re.fullmatch(r"api/v(1\.0|0\.1)/status/[^/]+", route)
        ):
            return "status"
        if method == "GET" and (
            route == "api/v1.0/metadata" or re.fullmatch(r"api/v(1\.0|0\.1)/metadata/[^/]+", route)
        ):
            return "metadata"
        return None
    if method == "POST" and (route == "v2/models/infer" or re.fullmatch(r"v2/models/[^/]+/infer", route)):
        return "predictions"
    if method == "GET" and (route == "v2/health/ready" or re.fullmatch(r"v2/models/[^/]+/ready", route)):
        return "status"
    if method == "GET" and re.fullmatch(r"v2/models/[^/]+", route):
        return "metadata"
    return None


class QueueProxyMetrics(MetricsEndpoint):
    """Knative's queue-proxy request metrics of one revision pod (see the module docstring)."""

    def __init__(self, namespace: str, service: str, configuration: str, revision: str, pod: str) -> None:
        super().__init__("/metrics")
        self.resource = {"namespace_name": namespace, "service_name": service, "configuration_name": configuration,
                         "revision_name": revision, "pod_name": pod, "container_name": "queue-proxy"}  # fmt: skip
        self.app_count = Counter(
            "revision_app_request_count", "The number of requests that are routed to user-container"
        )
        self.app_latency = Histogram(
            "revision_app_request_latencies", "The response time in millisecond", KNATIVE_BUCKETS
        )
        self.count = Counter("revision_request_count", "The number of requests that are routed to queue-proxy")
        self.latency = Histogram("revision_request_latencies", "The response time in millisecond", KNATIVE_BUCKETS)
        self.families = [self.app_count, self.app_latency, self.count, self.latency]

    def observe(self, code: int, seconds: float) -> None:
        ms = float(int(seconds * 1000))  # time.Duration.Milliseconds(): whole milliseconds
        labels = {**self.resource, "response_code": str(code), "response_code_class": f"{code // 100}xx"}
        # No Knative-Serving-Tag / Default-Route header reaches the pod: route_tag "DISABLED".
        routed = {**labels, "route_tag": "DISABLED"}
        with self.lock:
            self.app_count.inc(labels)
            self.app_latency.observe(labels, ms)
            self.count.inc(routed)
            self.latency.observe(routed, ms)
