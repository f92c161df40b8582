"""Continuous training and deployment with MLflow: train, gate, replace the served model in place.

Every day, and whenever new training data is announced (the ``wine_training_data`` asset), this DAG

1. trains a scikit-learn classifier on the wine data set that ships with scikit-learn, logs it to
   MLflow and registers a new version of the model;
2. scores the model currently served (the champion) on the same held-out data;
3. deploys the new version only if its accuracy is above ``accuracy_threshold`` **and** not worse
   than the champion's; otherwise the served model is kept and the run says why;
4. replaces the served model in place (same prediction URL), waits for health in the triggerer,
   smoke-tests a prediction, moves the MLflow alias ``champion`` to the served version and emits an
   asset event for the served model.

With the param ``deploy_through_alias``, step 4 is only "move ``champion`` to the accepted version":
``deploy_on_alias_move`` (whose watcher sees the move) deploys it, as it deploys a move made by hand
in the MLflow UI. See the README, "Deploying when an alias moves", for when to pick which.

Copy it and change the training task: the deploy part works for any MLflow model.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import DAG, Asset, Param, chain, task
from airflow.timetables.assets import AssetOrTimeSchedule
from airflow.timetables.trigger import CronTriggerTimetable

from airflow_provider_modeldeploy.operators import DeployModelOperator
from airflow_provider_modeldeploy.sensors import ServedModelHealthSensor

TRAINING_DATA = Asset("wine_training_data")
SERVED_MODEL = Asset("served_model_wine_classifier")
CONN_ID = None  # the default deployer connection (modeldeploy_default), or local MLflow defaults


def _mlflow_client(conn_id: str | None) -> Any:
    """Point MLflow at the deployer connection's tracking server, so training and serving agree."""
    import mlflow

    from airflow_provider_modeldeploy.deployers import get_model_deployer

    settings = get_model_deployer(conn_id).settings
    mlflow.set_tracking_uri(settings.tracking_uri)
    if settings.registry_uri:
        mlflow.set_registry_uri(settings.registry_uri)
    return mlflow.MlflowClient()


with DAG(
    dag_id="continuous_training_mlflow",
    description="Train, gate (champion/challenger) and replace the served wine classifier in place",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("@daily", timezone="UTC"), assets=[TRAINING_DATA]),
    catchup=False,
    max_active_runs=1,
    tags=["modeldeploy", "mlflow", "ct/cd"],
    params={
        "model_name": Param("wine-classifier", type="string", pattern=r"^[a-z0-9][a-z0-9._-]{0,61}[a-z0-9]$"),
        "experiment": Param("continuous_training", type="string"),
        "accuracy_threshold": Param(0.85, type="number", minimum=0, maximum=1),
        "C": Param(1.0, type="number", exclusiveMinimum=0, description="Inverse regularisation strength"),
        "test_size": Param(0.3, type="number", exclusiveMinimum=0, exclusiveMaximum=1),
        "seed": Param(None, type=["null", "integer"], description="Data split seed; empty: new per run"),
        "deploy_through_alias": Param(
            False,
            type="boolean",
            description="Only move the alias 'champion' to an accepted version; deploy_on_alias_move deploys it",
        ),
    },
) as dag:

    @task
    def train(params: dict[str, Any], run_id: str) -> dict[str, Any]:
        """Train a challenger and score it, and the served champion, on the same held-out data."""
        import tempfile
        import zlib

        import mlflow
        from sklearn.datasets import load_wine
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import accuracy_score
        from sklearn.model_selection import train_test_split
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        from airflow_provider_modeldeploy import config
        from airflow_provider_modeldeploy.deployers import find_services

        client = _mlflow_client(CONN_ID)
        seed = params["seed"] if params["seed"] is not None else zlib.crc32(run_id.encode()) % 10_000
        X, y = load_wine(return_X_y=True, as_frame=True)
        X_train, X_test, y_train, y_test = train_test_split(
            X, y, test_size=params["test_size"], random_state=seed, stratify=y
        )
        model = make_pipeline(StandardScaler(), LogisticRegression(C=params["C"], max_iter=1000)).fit(X_train, y_train)
        accuracy = float(accuracy_score(y_test, model.predict(X_test)))

        champion = next(iter(find_services(model_name=params["model_name"], running=True)), None)
        champion_accuracy = None
        if champion is not None:
            # Into a directory removed after scoring: left to itself, MLflow copies a model it cannot read
            # in place (a remote artifact store) into a new temporary directory that nothing removes.
            with tempfile.TemporaryDirectory() as tmp:
                served = mlflow.pyfunc.load_model(champion.record.served_uri or champion.record.model_uri, dst_path=tmp)
                champion_accuracy = float(accuracy_score(y_test, served.predict(X_test)))

        experiment = client.get_experiment_by_name(params["experiment"])
        if experiment is None:
            artifacts = None
            if mlflow.get_tracking_uri().startswith("sqlite:"):
                # A SQLite store has no artifact server: keep artifacts beside it, never in the CWD.
                artifacts = (config.airflow_home() / "mlflow" / "artifacts").as_uri()
            client.create_experiment(params["experiment"], artifact_location=artifacts)
        mlflow.set_experiment(params["experiment"])
        with mlflow.start_run(run_name=f"train-{run_id}") as run:
            mlflow.log_params({"C": params["C"], "seed": seed, "test_size": params["test_size"]})
            mlflow.log_metric("accuracy", accuracy)
            if champion_accuracy is not None:
                mlflow.log_metric("champion_accuracy", champion_accuracy)
            # The requirements are what loading the model takes (MLflow adds itself): scikit-learn and
            # skops, the format it is saved in. Left to MLflow, each training run would start a Python
            # that loads the model to see what it imports: seconds, and it lists whatever the task's
            # environment had imported besides (pytest, rich...).
            info = mlflow.sklearn.log_model(
                model, name="model", input_example=X_test.head(3), registered_model_name=params["model_name"],
                serialization_format="skops",
                pip_requirements=mlflow.sklearn.get_default_pip_requirements(include_skops=True),
            )  # fmt: skip
        version = str(info.registered_model_version)
        print(f"Trained version {version}: accuracy {accuracy:.4f} (champion: {champion_accuracy})")
        return {
            "model_uri": f"models:/{params['model_name']}/{version}",
            "version": version,
            "mlflow_run_id": run.info.run_id,
            "accuracy": accuracy,
            "champion_accuracy": champion_accuracy,
            "champion_uuid": champion.uuid if champion else None,
            "sample": X_test.head(3).to_dict(orient="split"),
        }

    @task.branch
    def gate(trained: dict[str, Any], params: dict[str, Any]) -> str:
        """Deploy only a challenger above the threshold and not worse than the champion."""
        accuracy, champion = trained["accuracy"], trained["champion_accuracy"]
        if accuracy < params["accuracy_threshold"]:
            print(f"Refused: accuracy {accuracy:.4f} is below the threshold {params['accuracy_threshold']}")
            return "keep_serving"
        if champion is not None and accuracy < champion:
            print(f"Refused: accuracy {accuracy:.4f} is worse than the served champion's {champion:.4f}")
            return "keep_serving"
        print(f"Accepted: accuracy {accuracy:.4f} (threshold {params['accuracy_threshold']}, champion {champion})")
        return "hand_over_to_alias" if params["deploy_through_alias"] else "deploy"

    @task
    def keep_serving(trained: dict[str, Any]) -> None:
        print(
            f"Version {trained['version']} was not deployed; service {trained['champion_uuid']} keeps serving "
            f"(challenger accuracy {trained['accuracy']:.4f}, champion {trained['champion_accuracy']})"
        )

    @task
    def hand_over_to_alias(trained: dict[str, Any], params: dict[str, Any]) -> None:
        """Move ``champion`` to the accepted version; the alias watcher's DAG deploys it."""
        client = _mlflow_client(CONN_ID)
        client.set_registered_model_alias(params["model_name"], "champion", trained["version"])
        print(
            f"Alias 'champion' of {params['model_name']} now points to version {trained['version']}: "
            "deploy_on_alias_move deploys it once its watcher sees the move"
        )

    deploy = DeployModelOperator(
        task_id="deploy",
        model_uri="{{ ti.xcom_pull(task_ids='train')['model_uri'] }}",
        model_name="{{ params.model_name }}",
        conn_id=CONN_ID,
        replace=True,
        timeout=300,
    )

    wait_healthy = ServedModelHealthSensor(
        task_id="wait_healthy",
        service_uuid="{{ ti.xcom_pull(task_ids='deploy')['uuid'] }}",
        deferrable=True,
        poke_interval=2,
        timeout=300,
    )

    @task
    def smoke_predict(served: dict[str, Any], trained: dict[str, Any]) -> list[Any]:
        """Call the served model like a client would, with MLflow's scoring protocol."""
        import httpx

        sample = trained["sample"]
        body = {"dataframe_split": {"columns": sample["columns"], "data": sample["data"]}}
        answer = httpx.post(served["prediction_url"], json=body, timeout=30)
        answer.raise_for_status()
        predictions = answer.json()["predictions"]
        if len(predictions) != len(sample["data"]):
            raise ValueError(f"expected {len(sample['data'])} predictions, got {predictions!r}")
        print(f"{served['prediction_url']} answered {predictions} (version {answer.headers.get('x-model-version')})")
        return predictions

    @task(outlets=[SERVED_MODEL])
    def promote_champion(served: dict[str, Any], outlet_events: Any = None) -> None:
        """Move the MLflow alias ``champion`` to the served version and announce the served model."""
        client = _mlflow_client(CONN_ID)
        client.set_registered_model_alias(served["model_name"], "champion", served["model_version"])
        outlet_events[SERVED_MODEL].extra = {
            "uuid": served["uuid"],
            "model_name": served["model_name"],
            "model_version": served["model_version"],
            "prediction_url": served["prediction_url"],
        }
        print(f"Alias 'champion' of {served['model_name']} now points to version {served['model_version']}")

    trained = train()
    decision = gate(trained)
    refused = keep_serving(trained)
    chain(trained, decision, [deploy, refused, hand_over_to_alias(trained)])
    chain(deploy, wait_healthy, smoke_predict(deploy.output, trained), promote_champion(deploy.output))
