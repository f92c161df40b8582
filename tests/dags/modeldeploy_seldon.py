"""A DAG for tests: deploy the session's iris model to Seldon (connection ``seldon``: the Kubernetes
API emulator, or the real cluster of docker/kind/run-e2e.sh) and wait for it with the real health
sensor, in Seldon's protocol."""

from __future__ import annotations

import os

from airflow.sdk import DAG

from airflow_provider_modeldeploy.operators import DeployModelOperator
from airflow_provider_modeldeploy.sensors import ServedModelHealthSensor

MODEL_NAME = "iris-seldon"
#: A real cluster pulls images and downloads models: tests/seldon_env.py passes its rollout timeout.
TIMEOUT = int(float(os.environ.get("MODELDEPLOY_E2E_TIMEOUT", "240")))
SAMPLE_INPUT = {
    "data": {
        "names": ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"],
        "ndarray": [[5.1, 3.5, 1.4, 0.2]],
    }
}

with DAG(dag_id="modeldeploy_seldon", schedule=None, catchup=False, tags=["tests"]):
    deploy = DeployModelOperator(
        task_id="deploy", model_uri="models:/iris/1", model_name=MODEL_NAME, conn_id="seldon", timeout=TIMEOUT,
        backend_options={"smoke_input": SAMPLE_INPUT},
    )  # fmt: skip
    wait = ServedModelHealthSensor(
        task_id="wait", model_name=MODEL_NAME, sample_input=SAMPLE_INPUT, deferrable=True, poke_interval=1,
        timeout=TIMEOUT,
    )  # fmt: skip
    deploy >> wait
