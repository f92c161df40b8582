"""Continuous deployment to KServe: train, gate, deploy as a canary, check, promote.

The same loop as ``continuous_deployment_seldon``, served by KServe on Kubernetes (the
``modeldeploy_kserve`` connection ``CONN_ID``): the accepted version is deployed as a canary beside
the serving one (Standard mode: ``spec.canary[]``; Knative mode: ``canaryTrafficPercent``), taking
``canary_traffic_percent`` of the endpoint's traffic (0: a dark launch); once healthy and a smoke
prediction answers in the runtime's protocol (KServe's sklearn server, v1: ``{"instances": ...}``),
it is promoted to all traffic. If the canary fails its checks, the rollback task removes it and the
previous version takes all traffic again. The first deployment of an endpoint is deployed directly.

KServe downloads models from their storage URI (``s3://...``): the MLflow artifact store must be
reachable from the cluster (the connection's ``storage_conn_id`` makes the credentials Secret).
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import DAG, Param, chain, task

from airflow_provider_modeldeploy.operators import (
    DeployModelOperator,
    PromoteServedModelOperator,
    RollbackServedModelOperator,
)
from airflow_provider_modeldeploy.sensors import ServedModelHealthSensor

CONN_ID = "modeldeploy_kserve"

with DAG(
    dag_id="continuous_deployment_kserve",
    description="Train, gate, canary-deploy to KServe, smoke-test and promote",
    schedule="@daily",
    catchup=False,
    max_active_runs=1,
    tags=["modeldeploy", "kserve", "ct/cd"],
    render_template_as_native_obj=True,  # canary percent as an int, the sample as JSON
    params={
        "model_name": Param("wine-classifier", type="string", pattern=r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"),
        "experiment": Param("continuous_deployment_kserve", type="string"),
        "accuracy_threshold": Param(0.85, type="number", minimum=0, maximum=1),
        "canary_traffic_percent": Param(20, type="integer", minimum=0, maximum=99),
        "C": Param(1.0, type="number", exclusiveMinimum=0),
    },
) as dag:

    @task
    def train(params: dict[str, Any], run_id: str) -> dict[str, Any]:
        """Train and register a challenger; note whether a version already serves (canary or not)."""
        import mlflow
        from sklearn.datasets import load_wine
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import accuracy_score
        from sklearn.model_selection import train_test_split

        from airflow_provider_modeldeploy.deployers import find_services, get_model_deployer

        deployer = get_model_deployer(CONN_ID)
        if deployer.settings.tracking_uri:
            mlflow.set_tracking_uri(deployer.settings.tracking_uri)
        X, y = load_wine(return_X_y=True, as_frame=True)
        X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
        model = LogisticRegression(C=params["C"], max_iter=5000).fit(X_train, y_train)
        accuracy = float(accuracy_score(y_test, model.predict(X_test)))
        mlflow.set_experiment(params["experiment"])
        with mlflow.start_run(run_name=f"train-{run_id}"):
            mlflow.log_metric("accuracy", accuracy)
            info = mlflow.sklearn.log_model(model, name="model", registered_model_name=params["model_name"])
        serving = find_services(model_name=params["model_name"], running=True)
        sample = X_test.head(3)
        return {
            "model_uri": f"models:/{params['model_name']}/{info.registered_model_version}",
            "accuracy": accuracy,
            "first": not serving,
            "sample": {"instances": sample.values.tolist()},  # the sklearn server's v1 protocol
        }

    @task.branch
    def gate(trained: dict[str, Any], params: dict[str, Any]) -> str | None:
        if trained["accuracy"] < params["accuracy_threshold"]:
            print(f"Refused: accuracy {trained['accuracy']:.4f} < {params['accuracy_threshold']}")
            return None
        return "deploy_first" if trained["first"] else "deploy_canary"

    deploy_first = DeployModelOperator(
        task_id="deploy_first",
        model_uri="{{ ti.xcom_pull(task_ids='train')['model_uri'] }}",
        model_name="{{ params.model_name }}",
        conn_id=CONN_ID,
    )
    deploy_canary = DeployModelOperator(
        task_id="deploy_canary",
        model_uri="{{ ti.xcom_pull(task_ids='train')['model_uri'] }}",
        model_name="{{ params.model_name }}",
        conn_id=CONN_ID,
        backend_options={"canary_traffic_percent": "{{ params.canary_traffic_percent | int }}"},
    )
    wait_canary = ServedModelHealthSensor(
        task_id="wait_canary",
        service_uuid="{{ ti.xcom_pull(task_ids='deploy_canary')['uuid'] }}",
        sample_input="{{ ti.xcom_pull(task_ids='train')['sample'] | tojson }}",
        deferrable=True,
        poke_interval=5,
        timeout=600,
    )

    @task
    def smoke_predict(served: dict[str, Any], trained: dict[str, Any]) -> list[Any]:
        """Call the endpoint like a client would, in the runtime's protocol (v1)."""
        import httpx

        answer = httpx.post(served["prediction_url"], json=trained["sample"], timeout=30)
        answer.raise_for_status()
        return answer.json()["predictions"]

    promote = PromoteServedModelOperator(
        task_id="promote", service_uuid="{{ ti.xcom_pull(task_ids='deploy_canary')['uuid'] }}"
    )
    rollback = RollbackServedModelOperator(
        task_id="rollback_canary",
        service_uuid="{{ ti.xcom_pull(task_ids='deploy_canary')['uuid'] }}",
        trigger_rule="one_failed",
    )

    trained = train()
    decision = gate(trained)
    chain(trained, decision, [deploy_first, deploy_canary])
    smoke = smoke_predict(deploy_canary.output, trained)
    chain(deploy_canary, wait_canary, smoke, promote)
    chain([wait_canary, smoke], rollback)
