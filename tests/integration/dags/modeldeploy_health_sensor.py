"""A DAG for tests: deploy the session's iris model, then wait for it with the deferrable sensor.

The sensor picks the service by model name, so ``airflow tasks test`` can run it on its own (a
``tasks test`` run keeps no XCom for the next one).
"""

from __future__ import annotations

import os

from airflow.sdk import DAG

from airflow_provider_modeldeploy.operators import DeployModelOperator
from airflow_provider_modeldeploy.sensors import ServedModelHealthSensor

MODEL_NAME = "iris-sensor"
SAMPLE_INPUT = {
    "dataframe_split": {
        "columns": ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"],
        "data": [[5.1, 3.5, 1.4, 0.2]],
    }
}

#: The test stops the service and starts it again at its URL: it passes a port of the kernel's ephemeral
#: range, as the default range's first ports are what every other deployment (other test workers) tries.
PORT = os.environ.get("MODELDEPLOY_TEST_PORT")

with DAG(dag_id="modeldeploy_health_sensor", schedule=None, catchup=False, tags=["tests"]):
    deploy = DeployModelOperator(
        task_id="deploy",
        model_uri="models:/iris/1",
        model_name=MODEL_NAME,
        timeout=300,
        backend_options={"port": int(PORT)} if PORT else None,
    )
    wait = ServedModelHealthSensor(
        task_id="wait",
        model_name=MODEL_NAME,
        sample_input=SAMPLE_INPUT,
        deferrable=True,
        poke_interval=1,
        timeout=240,
    )
    wait_missing = ServedModelHealthSensor(task_id="wait_missing", model_name="no-such-model", deferrable=True)
    deploy >> wait
