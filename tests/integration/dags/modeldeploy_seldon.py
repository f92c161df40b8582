"""DAGs for tests of the Seldon backend (connection ``seldon``: the Kubernetes API emulator, or the
real cluster of docker/kind/run-e2e.sh).

``modeldeploy_seldon`` deploys the session's iris model and waits for it with the real health
sensor, in Seldon's protocol. ``modeldeploy_seldon_ops`` promotes the canary of endpoint
``iris-ops`` and rolls it back, picking the service by model name (``airflow tasks test`` runs one
task at a time and keeps no XCom for the next).
"""

from __future__ import annotations

import os

from airflow.sdk import DAG

from airflow_provider_modeldeploy.operators import (
    DeployModelOperator,
    PromoteServedModelOperator,
    RollbackServedModelOperator,
)
from airflow_provider_modeldeploy.sensors import ServedModelHealthSensor

MODEL_NAME = "iris-seldon"
OPS_MODEL_NAME = "iris-ops"
#: A real cluster pulls images and downloads models: tests/integration/seldon_env.py passes its rollout timeout.
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

with DAG(dag_id="modeldeploy_seldon_ops", schedule=None, catchup=False, tags=["tests"]):
    PromoteServedModelOperator(task_id="promote", model_name=OPS_MODEL_NAME, timeout=TIMEOUT)
    RollbackServedModelOperator(task_id="rollback", model_name=OPS_MODEL_NAME, timeout=TIMEOUT)
