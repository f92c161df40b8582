"""What a served model's traffic looked like: the typed result of ``BaseModelDeployer.metrics``.

Backends hand :func:`build` their raw figures as *increases per time slice* (the serving agent's
per-minute rows, or a Prometheus ``query_range`` answer), each ``{"t": unix time of the slice,
"model_version", "series": {"requests:2xx": n, "bucket:0.005": n, "sum": s, "rows": n,
"in_flight": n}}`` (the series of ``serving/metrics_store.py``); this module puts them into the
window's steps and computes error rates and latency quantiles the way Prometheus does, so that the
page, the plugin API and the CLI show the same numbers.

"Not available" is a state of its own (``available=False`` and a reason): never zeros.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

#: window name -> (seconds, step seconds)
WINDOWS: dict[str, tuple[int, int]] = {"1h": (3600, 60), "1d": (86400, 900)}
QUANTILES = (0.5, 0.95, 0.99)
#: The endpoint history's actions shown on the charts.
EVENT_ACTIONS = frozenset({"deploy", "replace", "rollback", "promote", "canary"})


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile`` (promql ``bucketQuantile``) on ``(upper bound, cumulative
    count)`` pairs: linear interpolation inside the bucket holding the rank; the lowest bucket starts
    at 0 (unless its bound is not positive); a rank in the +Inf bucket gives the highest finite bound.
    None where Prometheus gives NaN (no observations, no +Inf bucket, fewer than two buckets)."""
    if math.isnan(q):
        return None
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    merged: dict[float, float] = {}
    for bound, count in buckets:
        merged[bound] = merged.get(bound, 0.0) + count
    ordered = sorted(merged.items())
    if len(ordered) < 2 or not math.isinf(ordered[-1][0]):
        return None
    # Counts must not fall with the bound (they may, slightly, across scrapes): Prometheus evens them out.
    fixed, highest = [], 0.0
    for bound, count in ordered:
        highest = max(highest, count)
        fixed.append((bound, highest))
    observations = fixed[-1][1]
    if observations == 0:
        return None
    rank = q * observations
    b = next(i for i, (_bound, count) in enumerate(fixed) if count >= rank)
    if b == len(fixed) - 1:
        return fixed[-2][0]
    if b == 0 and fixed[0][0] <= 0:
        return fixed[0][0]
    start, end, count = 0.0, fixed[b][0], fixed[b][1]
    if b > 0:
        start = fixed[b - 1][0]
        count -= fixed[b - 1][1]
        rank -= fixed[b - 1][1]
    return start + (end - start) * (rank / count)


@dataclass
class MetricsPoint:
    t: datetime  # the step's start
    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    server_errors: int = 0
    rows: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None


@dataclass
class VersionSeries:
    model_version: str
    role: str  # main | canary | previous
    points: list[MetricsPoint]


@dataclass
class MetricsSummary:
    requests: int = 0
    errors: int = 0
    error_rate: float | None = None
    requests_per_minute: float = 0.0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    in_flight: int | None = None
    rows: int = 0


@dataclass
class MetricsEvent:
    t: datetime
    action: str
    model_version: str | None


@dataclass
class ServiceMetrics:
    """One service's traffic over a window (the plugin API's answer, field for field)."""

    uuid: str
    window: str
    step_seconds: int
    start: datetime
    end: datetime
    available: bool
    reason: str | None = None
    source: str | None = None  # serving-agent | prometheus
    versions: list[VersionSeries] = field(default_factory=list)
    summary: MetricsSummary = field(default_factory=MetricsSummary)
    events: list[MetricsEvent] = field(default_factory=list)
    #: Every version together, per step (the sparklines); not part of the API's answer.
    totals: list[MetricsPoint] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("totals")
        return _iso(data)

    @classmethod
    def unavailable(cls, uuid: str, window: str, reason: str, now: float | None = None) -> ServiceMetrics:
        start, end, step = window_bounds(window, now)
        return cls(
            uuid=uuid, window=window, step_seconds=step, start=_dt(start), end=_dt(end), available=False,
            reason=reason, summary=MetricsSummary(requests_per_minute=0.0),
        )  # fmt: skip


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _iso(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_iso(v) for v in value]
    return value


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def window_bounds(window: str, now: float | None = None) -> tuple[int, int, int]:
    """Start, end (Unix times) and step of ``window`` ending with the step in progress."""
    if window not in WINDOWS:
        raise ValueError(f"window={window!r}: one of {', '.join(WINDOWS)}")
    seconds, step = WINDOWS[window]
    now = time.time() if now is None else now
    end = int(now // step * step + step)
    return end - seconds, end, step


def _add(into: dict[str, float], series: dict[str, float]) -> None:
    for name, value in series.items():
        if name != "in_flight":
            into[name] = into.get(name, 0.0) + value


def _point(t: int, series: dict[str, float]) -> MetricsPoint:
    client = series.get("requests:4xx", 0.0)
    server = series.get("requests:5xx", 0.0)
    requests = sum(v for k, v in series.items() if k.startswith("requests:"))
    p50, p95, p99 = _quantiles_ms(series)
    return MetricsPoint(
        t=_dt(t), requests=round(requests), errors=round(client + server), client_errors=round(client),
        server_errors=round(server), rows=round(series.get("rows", 0.0)), p50_ms=p50, p95_ms=p95, p99_ms=p99,
    )  # fmt: skip


def _quantiles_ms(series: dict[str, float]) -> tuple[float | None, ...]:
    buckets = [(float(k[7:]), v) for k, v in series.items() if k.startswith("bucket:")]
    out = []
    for q in QUANTILES:
        value = histogram_quantile(q, buckets)
        out.append(None if value is None else round(value * 1000, 3))
    return tuple(out)


def build(
    uuid: str,
    window: str,
    slices: Sequence[dict[str, Any]],
    *,
    source: str,
    role_of: Callable[[str], str],
    events: Iterable[dict[str, Any]] = (),
    now: float | None = None,
    in_flight_max_age: float = 300,
) -> ServiceMetrics:
    """The window's result from raw slices (see the module's docstring) and the endpoint's history.

    :param role_of: a slice's model version -> main, canary or previous.
    :param in_flight_max_age: the last in-flight reading counts as current within these seconds.
    """
    start, end, step = window_bounds(window, now)
    steps = range(start, end, step)
    per_version: dict[str, dict[int, dict[str, float]]] = {}
    total: dict[int, dict[str, float]] = {}
    window_total: dict[str, float] = {}
    in_flight_at, in_flight = -1, 0.0
    for s in slices:
        t = int(s["t"])
        if not start <= t < end:
            continue
        at = start + (t - start) // step * step
        version = str(s.get("model_version") or "")
        series = s.get("series") or {}
        _add(per_version.setdefault(version, {}).setdefault(at, {}), series)
        _add(total.setdefault(at, {}), series)
        _add(window_total, series)
        if "in_flight" in series:
            if t > in_flight_at:
                in_flight_at, in_flight = t, 0.0
            if t == in_flight_at:
                in_flight += series["in_flight"]
    versions = [
        VersionSeries(model_version=v, role=role_of(v), points=[_point(t, by_step.get(t, {})) for t in steps])
        for v, by_step in per_version.items()
    ]
    summary_point = _point(start, window_total)
    now_ts = time.time() if now is None else now
    summary = MetricsSummary(
        requests=summary_point.requests, errors=summary_point.errors,
        error_rate=summary_point.errors / summary_point.requests if summary_point.requests else None,
        requests_per_minute=round(summary_point.requests / ((end - start) / 60), 3),
        p50_ms=summary_point.p50_ms, p95_ms=summary_point.p95_ms, p99_ms=summary_point.p99_ms,
        in_flight=round(in_flight) if in_flight_at >= 0 and now_ts - in_flight_at <= in_flight_max_age else None,
        rows=summary_point.rows,
    )  # fmt: skip
    return ServiceMetrics(
        uuid=uuid, window=window, step_seconds=step, start=_dt(start), end=_dt(end), available=True,
        source=source, versions=versions, summary=summary, events=chart_events(events, start, end),
        totals=[_point(t, total.get(t, {})) for t in steps],
    )  # fmt: skip


def chart_events(history: Iterable[dict[str, Any]], start: float, end: float) -> list[MetricsEvent]:
    """The deploys, replaces, rollbacks and promotes of the endpoint's history within the window, oldest first."""
    out = []
    for event in history:
        if event.get("action") not in EVENT_ACTIONS or event.get("outcome", "success") != "success":
            continue
        created = event.get("created_at")
        when = datetime.fromisoformat(created) if isinstance(created, str) else created
        if when is None:
            continue
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        if start <= when.timestamp() < end:
            version = (event.get("details") or {}).get("model_version")
            out.append(MetricsEvent(t=when, action=str(event["action"]), model_version=version))
    return sorted(out, key=lambda e: e.t)
