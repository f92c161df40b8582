"""Latency of the Served Models list API at 10 and at 10,000 services.

Starts a real ``airflow api-server`` (SimpleAuthManager) in a temporary AIRFLOW_HOME whose registry
is seeded with registry rows (no servers), then times ``GET /served-models/api/services`` (the
first page: 25 rows, default sort, plus the total count) as the page's JavaScript calls it, with an
admin's Bearer token. After 3 warm-up requests, the median (and min, max) of 20 requests is
reported for each size. A filtered page (``?model=model-7&state=inactive``) is timed too.

Usage::

    python bench/ui_latency.py [--requests 20] [--json ui_latency.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from ui_helpers import running_api_server, seed_rows


def timed(client: Any, params: dict[str, Any], n: int) -> dict[str, float]:
    for _ in range(3):
        client.get("/api/services", params=params).raise_for_status()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        resp = client.get("/api/services", params=params)
        samples.append((time.perf_counter() - start) * 1000)
        resp.raise_for_status()
    return {
        "median_ms": round(statistics.median(samples), 1),
        "min_ms": round(min(samples), 1),
        "max_ms": round(max(samples), 1),
        "total": resp.json()["total"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ui-latency-"))
    home = base / "airflow"
    url = f"sqlite:///{home / 'modeldeploy' / 'registry.db'}"
    os.environ.update(AIRFLOW_HOME=str(home), AIRFLOW__MODELDEPLOY__REGISTRY_SQL_ALCHEMY_CONN=url)
    results: dict[str, Any] = {}
    try:
        from airflow_provider_modeldeploy.registry import get_registry

        with running_api_server(home) as server, server.client("admin") as client:
            registry = get_registry(url)
            seeded = 0
            for size in (10, 10_000):
                seed_rows(registry, size - seeded, prefix=f"s{size}")
                seeded = size
                results[str(size)] = {
                    "first_page": timed(client, {"limit": 25}, args.requests),
                    "filtered": timed(client, {"limit": 25, "model": "model-7", "state": "inactive"}, args.requests),
                }
                print(f"{size:>6} services: {results[str(size)]}", file=sys.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("| services | first page median (ms) | min | max | filtered median (ms) |")
    print("|---:|---:|---:|---:|---:|")
    for size, r in results.items():
        p, f = r["first_page"], r["filtered"]
        print(f"| {size} | {p['median_ms']} | {p['min_ms']} | {p['max_ms']} | {f['median_ms']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
