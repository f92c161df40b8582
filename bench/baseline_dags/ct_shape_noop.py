"""Airflow's own cost of running the example CT/CD DAG's shape, with tasks that do nothing.

The benchmark of target 6 runs this DAG under ``airflow dags test`` side by side with
``dags/continuous_training_mlflow.py``: same tasks, same dependencies, same branch and XComs, no
training, no MLflow, no deployer. What its run takes beyond its ``train`` task is what Airflow
itself spends on a run of that shape (creating the run, starting the first task, scheduling the
others) on this machine at that moment.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import DAG, chain, task

with DAG(dag_id="ct_shape_noop", schedule=None, catchup=False, tags=["modeldeploy-bench"]):

    @task
    def train() -> dict[str, Any]:
        return {"model_uri": "models:/noop/1", "accuracy": 1.0}

    @task.branch
    def gate(trained: dict[str, Any]) -> str:
        return "deploy"

    @task
    def keep_serving(trained: dict[str, Any]) -> None:
        return None

    @task
    def deploy(trained: dict[str, Any]) -> dict[str, Any]:
        return {"uuid": "noop", "prediction_url": "http://127.0.0.1/invocations"}

    @task
    def wait_healthy(served: dict[str, Any]) -> None:
        return None

    @task
    def smoke_predict(served: dict[str, Any], trained: dict[str, Any]) -> list[Any]:
        return [0]

    @task
    def promote_champion(served: dict[str, Any]) -> None:
        return None

    trained = train()
    decision = gate(trained)
    served = deploy(trained)
    chain(trained, decision, [served, keep_serving(trained)])
    chain(served, wait_healthy(served), smoke_predict(served, trained), promote_champion(served))
