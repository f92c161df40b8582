"""The serving agent's time series of its model servers' metrics.

Every ``interval`` seconds (``[modeldeploy] metrics_interval``, default 15) the agent reads each
active server's ``/metrics`` (on its private staging socket: nothing crosses the network and the
request path is not touched) and adds the increase since the previous reading to the current
minute, per service uuid, model version and series, in ``<agent state dir>/metrics.db`` (SQLite,
0600), kept for :data:`RETENTION`. Series::

    requests:<status class>   answers (2xx, 4xx, 5xx, ...)
    bucket:<le>               the latency histogram's cumulative buckets (seconds)
    sum                       seconds spent answering
    rows                      rows scored
    in_flight                 a gauge: the last reading of the minute, not an increase

Increases follow Prometheus' ``increase()`` on counters: a value lower than the previous reading,
or another server process (a restart: same uuid, new master), is a reset, and the whole new value is
the increase. A server the agent never read before started from zero, unless it was already running
when this agent started sampling (adopted): then its first reading is only the baseline.
An increase is put in the minute of the reading that saw it (up to one interval late).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("modeldeploy.agent")

RETENTION = 25 * 3600
DEFAULT_INTERVAL = 15.0
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS points (uuid TEXT NOT NULL, t INTEGER NOT NULL, model_version TEXT NOT NULL, "
    "series TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (uuid, t, model_version, series)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS points_t ON points (t)",
    "CREATE TABLE IF NOT EXISTS last (uuid TEXT NOT NULL, generation TEXT NOT NULL, model_version TEXT NOT NULL, "
    "series TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (uuid, model_version, series)) WITHOUT ROWID",
)
_NAMES = {
    "modeldeploy_requests_total": "requests",
    "modeldeploy_request_duration_seconds_bucket": "bucket",
    "modeldeploy_request_duration_seconds_sum": "sum",
    "modeldeploy_payload_rows_total": "rows",
    "modeldeploy_requests_in_flight": "in_flight",
}


def parse(text: str) -> dict[tuple[str, str], float]:
    """``{(model_version, series): value}`` from a server's Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            kind = _NAMES.get(sample.name)
            if kind is None:
                continue
            version = sample.labels.get("model_version", "")
            if kind == "requests":
                kind = f"requests:{sample.labels.get('status_class', 'other')}"
            elif kind == "bucket":
                kind = f"bucket:{sample.labels.get('le', '+Inf')}"
            values[(version, kind)] = values.get((version, kind), 0.0) + sample.value
    return values


def increases(
    now: dict[tuple[str, str], float], before: dict[tuple[str, str], float] | None
) -> dict[tuple[str, str], float]:
    """What each counter rose by since ``before`` (None: the server started from zero), resets
    counted as Prometheus does; gauges are passed through."""
    out = {}
    for key, value in now.items():
        if key[1] == "in_flight":
            out[key] = value
            continue
        previous = None if before is None else before.get(key)
        if previous is None or value < previous:  # new, or reset: it counted up from zero
            previous = 0.0
        if value - previous > 0:
            out[key] = value - previous
    return out


class MetricsStore:
    """The SQLite file; one connection shared by the sampler and the API's threads, under a lock."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # 0600 before SQLite opens it
        os.close(fd)
        self.path = path
        self.lock = threading.Lock()
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        with self.lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            for statement in _SCHEMA:
                self.db.execute(statement)
        self.purged = 0.0

    def add(self, uuid: str, generation: str, values: dict[tuple[str, str], float], at: float, baseline: bool) -> None:
        """Record one reading of a server: its increases go into the minute of ``at``."""
        minute = int(at // 60 * 60)
        with self.lock:
            rows = self.db.execute(
                "SELECT generation, model_version, series, value FROM last WHERE uuid = ?", (uuid,)
            ).fetchall()
            # The previous reading of this process; None when there is none (a new process counts
            # from zero: a restart is a reset), unless it is only the baseline of an adopted server.
            before = {(r[1], r[2]): r[3] for r in rows if r[0] == generation} or None
            record = before is not None or bool(rows) or not baseline
            self.db.execute("BEGIN")
            try:
                if record:
                    for (version, series), value in increases(values, before).items():
                        if series == "in_flight":
                            self.db.execute(
                                "INSERT INTO points VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET value = excluded.value",
                                (uuid, minute, version, series, value),
                            )
                        else:
                            self.db.execute(
                                "INSERT INTO points VALUES (?, ?, ?, ?, ?) "
                                "ON CONFLICT DO UPDATE SET value = value + excluded.value",
                                (uuid, minute, version, series, value),
                            )
                self.db.execute("DELETE FROM last WHERE uuid = ?", (uuid,))
                self.db.executemany(
                    "INSERT INTO last VALUES (?, ?, ?, ?, ?)",
                    [(uuid, generation, v, s, value) for (v, s), value in values.items() if s != "in_flight"],
                )
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            if at - self.purged > 600:
                self.db.execute("DELETE FROM points WHERE t < ?", (int(at - RETENTION),))
                self.purged = at

    def known(self, uuid: str) -> bool:
        with self.lock:
            return self.db.execute("SELECT 1 FROM last WHERE uuid = ? LIMIT 1", (uuid,)).fetchone() is not None

    def query(self, uuid: str, start: float, end: float) -> list[dict[str, Any]]:
        """The minutes of ``uuid`` in ``[start, end)``: ``{"t", "model_version", "series": {name: value}}``."""
        with self.lock:
            rows = self.db.execute(
                "SELECT t, model_version, series, value FROM points WHERE uuid = ? AND t >= ? AND t < ? "
                "ORDER BY t, model_version",
                (uuid, int(start // 60 * 60), int(end)),
            ).fetchall()
        points: dict[tuple[int, str], dict[str, Any]] = {}
        for t, version, series, value in rows:
            point = points.setdefault((t, version), {"t": t, "model_version": version, "series": {}})
            point["series"][series] = value
        return list(points.values())

    def close(self) -> None:
        with self.lock:
            self.db.close()


class Sampler:
    """Reads the servers' pages; driven by the agent's thread (:meth:`run`) or on request."""

    def __init__(self, agent: Any, interval: float) -> None:
        self.agent = agent
        self.interval = interval
        self.store = MetricsStore(agent.state_dir / "metrics.db")
        self.since = time.time()  # servers already running before this are adopted: no backfill
        self.lock = threading.Lock()  # one reading of a server at a time (the thread, the API, a stop)

    def run(self) -> None:
        while not self.agent.stopping.wait(self.interval):
            try:
                self.sample_all()
            except Exception:
                log.exception("metrics sampling failed")

    def sample_all(self) -> int:
        with self.agent.lock:
            services = [m for m in self.agent.services.values() if m.phase == "active"]
        return sum(self.sample(m) for m in services)

    def sample(self, m: Any) -> int:
        """Read one server's page and record it; 1 if read (a server that does not answer is skipped)."""
        import httpx

        generation = f"{m.pid}:{m.started}"
        with self.lock:
            try:
                with self.agent.staging_client(m, timeout=5) as client:
                    answer = client.get("/metrics")
            except (httpx.HTTPError, OSError):
                return 0
            if answer.status_code != 200:
                return 0  # metrics off, or a server from before them
            at = time.time()
            baseline = (m.started or 0) < self.since and not self.store.known(m.uuid)
            self.store.add(m.uuid, generation, parse(answer.text), at, baseline)
        return 1
