"""The benchmark command runs (a smoke run of its cheapest item); benchmarks themselves are not tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_bench_command_quick_run_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "docs"
    results = tmp_path / "results.json"
    command = [sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--only", "4", "--out-dir", str(out)]
    # Run as users run it, `python bench/run_all.py`: its own directory first on sys.path (for its
    # sibling modules), which PYTHONSAFEPATH, set for the tests, would leave out.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    done = subprocess.run(
        [*command, "--json", str(results)],
        capture_output=True,
        text=True,
        timeout=600,  # five Pythons importing Airflow's SDK: 108 s on this machine when busy, 120 was too tight
        check=False,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    item = json.loads(results.read_text())["4"]
    # The operator and the sensor import none of the heavy libraries, whatever the timing.
    assert item["heavy_imported"] == []
    assert item["over_sdk_ms"] > 0 and len(item["samples_ms"]) >= 5
    report = (out / "performance.md").read_text()
    assert "| 4 | import cost of operator + sensor |" in report
    assert "nproc=" in report and "How to reproduce" in report
