"""Deploy when an MLflow alias moves: redeploy whatever ``models:/<name>@<alias>`` names.

Someone promotes a model by moving an alias in the MLflow Model Registry (the MLflow UI, a notebook,
another pipeline, or ``continuous_training_mlflow`` with ``deploy_through_alias``). The triggerer
polls the alias (``MlflowAliasTrigger`` in an ``AssetWatcher``) and, when it names a version the
endpoint does not serve, emits an event on the alias's asset. This DAG, scheduled on that asset,

1. reads the version the event names (the latest event, when several arrived at once);
2. replaces the served model in place (same prediction URL), the endpoint history saying
   ``... (alias champion of wine-classifier moved 3 -> 4)``;
3. waits until it is healthy and makes a smoke prediction with the model's input example, checking
   the answer comes from that version.

Moving the alias back (a rollback in MLflow) deploys the earlier version again, at the same URL.
A manual run deploys what the alias names now.

What to watch is read when the file is parsed, from the environment (defaults in brackets):
``MODELDEPLOY_ALIAS_URI`` [models:/wine-classifier@champion], ``MODELDEPLOY_ALIAS_ENDPOINT``
[the model name], ``MODELDEPLOY_CONN_ID`` [the default deployer connection] and
``MODELDEPLOY_ALIAS_POLL_INTERVAL`` [30 seconds]. Copy the file for a second alias.
"""

from __future__ import annotations

import os
import re
from typing import Any

from airflow.sdk import DAG, Asset, AssetWatcher, task

from airflow_provider_modeldeploy.operators import DeployModelOperator
from airflow_provider_modeldeploy.sensors import ServedModelHealthSensor
from airflow_provider_modeldeploy.triggers.alias_watcher import MlflowAliasTrigger

MODEL_URI = os.environ.get("MODELDEPLOY_ALIAS_URI", "models:/wine-classifier@champion")
CONN_ID = os.environ.get("MODELDEPLOY_CONN_ID") or None
POLL_INTERVAL = float(os.environ.get("MODELDEPLOY_ALIAS_POLL_INTERVAL", "30"))

WATCHER = MlflowAliasTrigger(
    model_uris=[MODEL_URI],
    conn_id=CONN_ID,
    endpoint=os.environ.get("MODELDEPLOY_ALIAS_ENDPOINT") or None,
    poll_interval=POLL_INTERVAL,
)
TARGET = WATCHER.targets[0]
_SLUG = re.sub(r"[^a-z0-9_]+", "_", f"{TARGET.name}_{TARGET.alias}".lower())
ALIAS_MOVES = Asset(
    name=f"mlflow_alias_{_SLUG}",
    uri=f"mlflow-alias://{TARGET.name}/{TARGET.alias}",
    watchers=[AssetWatcher(name=f"mlflow_alias_watcher_{_SLUG}", trigger=WATCHER)],
)

with DAG(
    dag_id="deploy_on_alias_move",
    description=f"Deploy {MODEL_URI} to endpoint {TARGET.endpoint} whenever the alias moves",
    schedule=[ALIAS_MOVES],
    catchup=False,
    max_active_runs=1,  # moves are deployed in the order they were seen
    tags=["modeldeploy", "mlflow", "cd"],
) as dag:

    @task
    def which_version(triggering_asset_events: Any = None, dag_run: Any = None) -> dict[str, Any]:
        """The move to deploy: the latest the watcher reported, or (manual run) what the alias names now."""
        from airflow.sdk.exceptions import AirflowSkipException

        from airflow_provider_modeldeploy.deployers import find_services, get_model_deployer
        from airflow_provider_modeldeploy.hooks.mlflow_local import MlflowDeployerHook
        from airflow_provider_modeldeploy.mlflow_aliases import describe_move, read_alias

        events = list(triggering_asset_events[ALIAS_MOVES]) if triggering_asset_events else []
        moves = [(e.timestamp, e.extra["payload"]) for e in events if (e.extra or {}).get("payload")]
        served = next(iter(find_services(endpoint=TARGET.endpoint, running=True)), None)
        served_version = served.record.model_version if served else None
        if moves:
            move = max(moves, key=lambda m: m[0])[1]
        else:
            deployer = get_model_deployer(CONN_ID)
            named = read_alias(MlflowDeployerHook(deployer.conn_id).get_settings(), TARGET)
            if named is None:
                raise AirflowSkipException(f"{MODEL_URI} names no version")
            user = getattr(dag_run, "triggering_user_name", None)
            move = {
                "model_name": TARGET.name, "alias": TARGET.alias, "version": named.version,
                "previous_version": served_version, "moved_by": None,
                "manual": f"manual run{f' by {user}' if user else ''}",
            }  # fmt: skip
        if served_version == str(move["version"]):
            # Fired twice (a triggerer restart during the deployment), or a manual run with nothing to do.
            raise AirflowSkipException(f"endpoint {TARGET.endpoint} already serves version {move['version']}")
        reason = describe_move(move) + (f", {move['manual']}" if move.get("manual") else "")
        print(f"Deploying version {move['version']} of {TARGET.name} to {TARGET.endpoint}: {reason}")
        return {
            "model_uri": f"models:/{TARGET.name}/{move['version']}",
            "version": str(move["version"]),
            "reason": reason,
        }

    deploy = DeployModelOperator(
        task_id="deploy",
        model_uri="{{ ti.xcom_pull(task_ids='which_version')['model_uri'] }}",
        model_name=TARGET.name,
        endpoint=TARGET.endpoint,
        conn_id=CONN_ID,
        replace=True,
        timeout=300,
        reason="{{ ti.xcom_pull(task_ids='which_version')['reason'] }}",
    )

    wait_healthy = ServedModelHealthSensor(
        task_id="wait_healthy",
        service_uuid="{{ ti.xcom_pull(task_ids='deploy')['uuid'] }}",
        deferrable=False,
        poke_interval=2,
        timeout=300,
    )

    @task
    def smoke_predict(served: dict[str, Any], wanted: dict[str, Any]) -> list[Any]:
        """Call the endpoint like a client, with the model's own input example; the version must match."""
        import httpx
        import mlflow
        from mlflow.models import Model

        from airflow_provider_modeldeploy.deployers import get_model_deployer
        from airflow_provider_modeldeploy.hooks.mlflow_local import MlflowDeployerHook

        # Where the model is, with the connection's basic auth: this task's process is its own.
        os.environ.update(MlflowDeployerHook(get_model_deployer(CONN_ID).conn_id).get_settings().server_env())
        local = mlflow.artifacts.download_artifacts(wanted["model_uri"])
        example = Model.load(local).load_input_example(local)
        if example is None:
            raise ValueError(f"{wanted['model_uri']} has no input example to smoke-test with")
        body = (
            {"dataframe_split": example.to_dict(orient="split")} if hasattr(example, "to_dict") else {"inputs": example}
        )
        body.get("dataframe_split", {}).pop("index", None)
        answer = httpx.post(served["prediction_url"], json=body, timeout=30)
        answer.raise_for_status()
        version = answer.headers.get("x-model-version")
        if version != wanted["version"]:
            raise ValueError(f"{served['prediction_url']} answers with version {version}, not {wanted['version']}")
        print(f"{served['prediction_url']} (version {version}) answered {answer.json()['predictions']}")
        return answer.json()["predictions"]

    wanted = which_version()
    wanted >> deploy >> wait_healthy
    wait_healthy >> smoke_predict(deploy.output, wanted)
