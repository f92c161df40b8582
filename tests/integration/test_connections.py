"""Connections made the README's way, ``airflow connections add`` into Airflow's metadata database,
are what a deploy task and the CLI read: nothing injected through the environment."""

from __future__ import annotations

import json
import os
import random
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
from conftest import migrated_airflow_db, run_airflow

DAG_ID = "modeldeploy_conn_readme"
CONN_ID = "md_readme"


def ok(done: Any) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.mark.long
def test_a_connection_added_with_the_cli_is_what_a_deploy_reads(
    airflow_home: Path, airflow_db_template: Path, mlflow_models: dict[str, Any], tmp_path: Path
) -> None:
    from airflow_provider_modeldeploy.deployers import find_services

    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "deploy_with_conn.py").write_text(
        textwrap.dedent(
            f"""
            from airflow.sdk import DAG
            from airflow_provider_modeldeploy.operators.served_models import DeployModelOperator

            with DAG(dag_id="{DAG_ID}", schedule=None, catchup=False):
                DeployModelOperator(task_id="deploy", model_uri="models:/iris/1", model_name="iris-conn",
                                    conn_id="{CONN_ID}")
            """
        )
    )
    first = random.randrange(42000, 48000)
    extra = {
        "tracking_uri": os.environ["MLFLOW_TRACKING_URI"],
        "port_range": f"{first}-{first + 19}",
        "workers": 2,
        "timeout": 60,
    }
    # The task's process finds the tracking store only through the connection, and the connection
    # only in the metadata database (no AIRFLOW_CONN_*; the provider's test shortcut is off).
    env = {"AIRFLOW__CORE__DAGS_FOLDER": str(dags), "MLFLOW_TRACKING_URI": "", "_MODELDEPLOY_NO_METASTORE": ""}
    migrated_airflow_db(airflow_db_template, airflow_home)
    ok(
        run_airflow(
            airflow_home,
            "connections",
            "add",
            CONN_ID,
            "--conn-type",
            "modeldeploy_mlflow",
            "--conn-host",
            "127.0.0.1",
            "--conn-extra",
            json.dumps(extra),
            **env,
        )
    )
    out = ok(run_airflow(airflow_home, "tasks", "test", DAG_ID, "deploy", **env))
    assert "new_state=success" in out, out[-3000:]  # `tasks test` exits 0 even when the task fails

    [service] = find_services(model_name="iris-conn")
    record = service.record
    assert record.conn_id == CONN_ID and record.model_version == "1"
    assert first <= urlsplit(record.prediction_url).port <= first + 19, record.prediction_url
    assert urlsplit(record.prediction_url).hostname == "127.0.0.1"
    assert len(psutil.Process(record.pid).children()) == 2, "workers=2 from the connection's extra"

    # The CLI, a process of its own, reads the same connection from the metadata database to act.
    done = run_airflow(airflow_home, "served-models", "list", "-o", "json", "--model", "iris-conn", **env)
    ok(done)
    listed = json.loads(done.stdout)  # stdout holds the JSON alone: warnings Airflow logs go to stderr
    assert [s["uuid"] for s in listed] == [record.uuid]
    ok(run_airflow(airflow_home, "served-models", "stop", record.uuid, **env))
    assert find_services(model_name="iris-conn")[0].record.state == "inactive"
