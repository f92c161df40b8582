"""What a model server records about its prediction requests, and its ``GET /metrics`` page.

Per model version, with the Prometheus client library in multiprocess mode (each worker writes its
own memory-mapped files; a scrape of any worker sums them all)::

    modeldeploy_requests_total{model_version,status_class}     2xx / 4xx / 5xx ... answers
    modeldeploy_request_duration_seconds{model_version}         histogram, ms..s buckets
    modeldeploy_requests_in_flight{model_version}               gauge, summed over live workers
    modeldeploy_payload_rows_total{model_version}               rows the model scored

Only ``/invocations`` is counted (not ``/metrics``, ``/ping``, ``/health``). Requests refused by the
server's limits (413, 415, 431, 408, 503) are counted in ``requests_total`` but not in the latency
histogram: they never reached the model, and their near-zero times would hide its latency.

Each server generation (one master and its workers) gets its own directory, ``<run dir>/<uuid
key>-<random>.metrics`` (0700, files 0600): a new process starting from an old generation's files
would report counters that never reset. The master removes it when it exits, and the agent removes
any left by a server that was killed (:func:`remove_dirs`).

Cost per request matters (the fast path answers a request in about 0.3 ms of CPU, and each value
prometheus_client writes takes a lock and a memory-mapped write): a request only adds to plain
integers of its worker, and the worker writes them to its files once a second (and before it answers
``/metrics``), so a scrape may miss at most the last second of the other workers' requests. Every
label child is bound once per worker. Only the standard library is imported at module level.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import shutil
import tempfile
import time
from bisect import bisect_left
from pathlib import Path
from typing import Any

#: Latency buckets (seconds): the fast path answers in about a millisecond, MLflow's app in a few,
#: large batches or slow models in seconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PREDICTION_PATH = "/invocations"
METRICS_PATH = "/metrics"
_CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")
#: Seconds between two writes of a worker's figures to its metric files.
FLUSH_SECONDS = 1.0

#: Rows MLflow's app scored for the request in progress (set per request; the model's predict runs
#: in a thread that inherits the request's context).
_rows: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("modeldeploy_rows", default=None)


def make_dir(run_dir: str | Path, uuid: str) -> str:
    """A new private directory for one server generation's metric files."""
    return tempfile.mkdtemp(prefix=f"{uuid.replace('-', '')}-", suffix=".metrics", dir=str(run_dir))  # 0700


def remove_dirs(run_dir: str | Path, uuid: str) -> None:
    """Remove every metrics directory of a service (its servers are stopped)."""
    for path in Path(run_dir).glob(f"{uuid.replace('-', '')}-*.metrics"):
        shutil.rmtree(path, ignore_errors=True)


def count_rows(predict: Any) -> Any:
    """``predict`` that also notes how many rows it was given, for the request being answered."""

    def counting(data: Any, params: Any = None) -> Any:
        answer = predict(data, params=params)  # rows it refuses (schema enforcement raises) are not scored
        holder = _rows.get()
        if holder is not None:
            with contextlib.suppress(Exception):
                holder[0] += _length(data)
        return answer

    return counting


def note_rows(rows: int) -> None:
    """Rows scored outside MLflow's app (the fast path), for the request in progress."""
    holder = _rows.get()
    if holder is not None:
        holder[0] += rows


def _length(data: Any) -> int:
    if isinstance(data, dict):  # named tensors: rows are their first axis
        first = next(iter(data.values()), None)
        return len(first) if first is not None and hasattr(first, "__len__") else 1
    return len(data) if hasattr(data, "__len__") else 1


class ServerMetrics:
    """Made in the master (nothing imported), started in each worker after the fork."""

    def __init__(self, directory: str, model_version: str | None) -> None:
        self.directory = directory
        self.model_version = model_version or ""
        self.started = False

    def start_worker(self) -> None:
        """Open this worker's files and bind every label child (once: the request path looks nothing up)."""
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.directory
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
        from prometheus_client.multiprocess import MultiProcessCollector

        # Set here, not by the environment at import: the fork server may have imported the library.
        values.ValueClass = values.MultiProcessValue()
        version = self.model_version
        old_umask = os.umask(0o077)  # the files are created now, by the first value of each kind
        try:
            requests = Counter(
                "modeldeploy_requests", "Prediction requests answered, by status class",
                ["model_version", "status_class"], registry=None,
            )  # fmt: skip
            duration = Histogram(
                "modeldeploy_request_duration_seconds", "Time to answer a prediction request",
                ["model_version"], buckets=BUCKETS, registry=None,
            )  # fmt: skip
            in_flight = Gauge(
                "modeldeploy_requests_in_flight", "Prediction requests in progress", ["model_version"],
                registry=None, multiprocess_mode="livesum",
            )  # fmt: skip
            rows = Counter("modeldeploy_payload_rows", "Rows scored", ["model_version"], registry=None)
            self._status = [requests.labels(version, c) for c in _CLASSES]
            # The histogram's values (one per bucket, +Inf last, and the sum), written in bulk at each
            # flush: Histogram.observe() adds one observation at a time. Attributes of
            # prometheus_client's Histogram (0.20 to 0.26); tests/integration/test_metrics.py reads
            # the page they make.
            histogram = duration.labels(version)
            self._buckets, self._sum = histogram._buckets, histogram._sum
            self._in_flight_gauge = in_flight.labels(version)
            self._rows = rows.labels(version)
        finally:
            os.umask(old_umask)
        # What this worker counted since its last flush (the event loop's thread alone touches them).
        self.status_counts = [0] * len(_CLASSES)
        self.bucket_counts = [0] * (len(BUCKETS) + 1)
        self.seconds = 0.0
        self.rows = 0
        self.in_flight = 0
        self._armed = False
        self._registry = CollectorRegistry()
        MultiProcessCollector(self._registry, path=self.directory)
        self.started = True

    # -- per request (the worker's event loop) --------------------------------------------------------

    def begin(self) -> float:
        self.in_flight += 1
        if not self._armed:
            self._arm()
        return time.perf_counter()

    def end(self, started: float, status: int, rows: int = 0) -> None:
        elapsed = time.perf_counter() - started
        self.in_flight -= 1
        self.seconds += elapsed
        self.bucket_counts[bisect_left(BUCKETS, elapsed)] += 1  # Prometheus' le: bound inclusive
        self.status_counts[status // 100 if 100 <= status < 600 else 0] += 1
        self.rows += rows

    def refused(self, status: int) -> None:
        """A request the server's limits answered before the app (not in the latency histogram)."""
        if self.started:
            self.status_counts[status // 100 if 100 <= status < 600 else 0] += 1
            if not self._armed:
                self._arm()

    def _arm(self) -> None:
        """Flush within FLUSH_SECONDS, then every FLUSH_SECONDS while requests come (the event loop's timer)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self.flush()  # no loop (a test): at once
        self._armed = True

        def tick() -> None:
            busy = self.flush()
            if busy or self.in_flight:
                loop.call_later(FLUSH_SECONDS, tick)
            else:
                self._armed = False  # idle: the next request arms it again

        loop.call_later(FLUSH_SECONDS, tick)

    def flush(self) -> bool:
        """Write what was counted since the last flush to this worker's files; whether there was any."""
        wrote = False
        for i, n in enumerate(self.status_counts):
            if n:
                self._status[i].inc(n)
                self.status_counts[i] = 0
                wrote = True
        if any(self.bucket_counts):
            for i, n in enumerate(self.bucket_counts):
                if n:
                    self._buckets[i].inc(n)
                    self.bucket_counts[i] = 0
            self._sum.inc(self.seconds)
            self.seconds = 0.0
        if self.rows:
            self._rows.inc(self.rows)
            self.rows = 0
        self._in_flight_gauge.set(self.in_flight)
        return wrote

    @staticmethod
    def rows_holder() -> tuple[list[int], Any]:
        holder = [0]
        return holder, _rows.set(holder)

    @staticmethod
    def reset_rows(token: Any) -> None:
        _rows.reset(token)

    def page(self) -> tuple[bytes, str]:
        """The Prometheus text format of every worker's figures, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.flush()  # this worker's own figures are current; the others' at most FLUSH_SECONDS old
        return generate_latest(self._registry), CONTENT_TYPE_LATEST

    def worker_gone(self, pid: int) -> None:
        """In the master: a dead worker's in-flight requests are no longer in flight."""
        with contextlib.suppress(Exception):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.directory)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
