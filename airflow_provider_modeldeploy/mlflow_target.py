"""The ``modeldeploy`` target of MLflow's deployment API (entry point group ``mlflow.deployments``).

    mlflow deployments create -t modeldeploy:/modeldeploy_default --name iris -m models:/iris@champion
    mlflow deployments predict -t modeldeploy --name iris --input-path rows.json
    mlflow deployments update|get|list|delete -t modeldeploy ...

    from mlflow.deployments import get_deploy_client
    client = get_deploy_client("modeldeploy:/mlflow_prod")

A deployment is an endpoint of the provider: the same deployers, served-models registry and endpoint
history as DAGs and ``airflow served-models`` use. The target URI names the Airflow connection
(``modeldeploy:/<conn_id>``; plain ``modeldeploy``: the default connection, else local defaults),
looked up as the CLI does (``AIRFLOW_CONN_...``, secrets backends, the metadata database).

MLflow loads this module and requires ``run_local``, ``target_help`` and exactly one
``BaseDeploymentClient`` subclass in it: keep other client classes out of this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from mlflow.deployments import BaseDeploymentClient, PredictionsResponse
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
)

if TYPE_CHECKING:
    from airflow_provider_modeldeploy.deployers.base import BaseModelDeployer
    from airflow_provider_modeldeploy.services import Service

TARGET = "modeldeploy"
FLAVOR = "python_function"  # what every backend serves: MLflow's pyfunc scoring protocol
#: config keys of create / update that are not backend options
_OWN_CONFIG = {"deploy_timeout", "model_name"}


def target_help() -> str:
    return f"""\
Deploys MLflow models as tracked model servers of the Airflow provider airflow-provider-modeldeploy:
the same deployers, served-models registry and endpoint history as its DAGs, the Served Models page
and `airflow served-models`. A deployment is an endpoint; `update` replaces its model in place (the
prediction URL stays), `delete` stops and removes it (deleting a missing deployment is not an error).

Target URI: {TARGET}:/<conn_id>, the Airflow connection of the deployer (modeldeploy_mlflow for local
model servers, modeldeploy_seldon for Seldon Core), found through AIRFLOW_CONN_<CONN_ID>, a secrets
backend or Airflow's metadata database. `{TARGET}` alone: the default connection
([modeldeploy] default_conn_id), else local model servers with default settings.

Flavor: {FLAVOR} only (the default).

Config (-C key=value):
  deploy_timeout=<s>     how long the new server may take to load and answer (default 300)
  model_name=<name>      the model's name in the registry (default: the deployment name)
  <backend option>=...   e.g. workers=2, timeout=30, fast_path=false (local MLflow), replicas=2 (Seldon)
                         update keeps the options not given again

predict takes what `mlflow deployments predict` reads (a JSON file of records or columns) and answers
with MLflow's scoring protocol. get/list show the prediction URL, version, state and service uuid.
"""


def run_local(target: str, name: str, model_uri: str, flavor: str | None = None, config: dict | None = None) -> None:
    """Serve the model on this machine with the local MLflow backend, whatever the target's
    connection, and print its URL (it keeps serving: `mlflow deployments delete -t modeldeploy`)."""
    from airflow_provider_modeldeploy.deployers.mlflow_local import MLflowLocalDeployer

    client = ModelDeployDeploymentClient(TARGET)
    deployment = client._create(MLflowLocalDeployer(conn_id=None), name, model_uri, flavor, config)
    print(f"Deployment {name} serves {deployment['model_uri']} (version {deployment['model_version']}) "
          f"at {deployment['prediction_url']}")  # fmt: skip


@contextmanager
def _as_mlflow_errors() -> Iterator[None]:
    """Our errors, in our words, as the MlflowException the deployments API promises."""
    from airflow_provider_modeldeploy.exceptions import InvalidParameterError, ModelDeployError, ServiceNotFoundError
    from airflow_provider_modeldeploy.masking import mask_text

    try:
        yield
    except MlflowException:
        raise
    except ServiceNotFoundError as exc:
        raise MlflowException(mask_text(str(exc)), error_code=RESOURCE_DOES_NOT_EXIST) from None
    except InvalidParameterError as exc:
        raise MlflowException(mask_text(str(exc)), error_code=INVALID_PARAMETER_VALUE) from None
    except ModelDeployError as exc:
        raise MlflowException(mask_text(str(exc)), error_code=INTERNAL_ERROR) from None


def _actor() -> str:
    from airflow_provider_modeldeploy.deployers.base import default_actor

    return f"{default_actor()} (mlflow deployments)"


def _option_value(kind: type | tuple[type, ...], key: str, value: Any) -> Any:
    """`-C key=value` gives strings: turn them into the type the backend option declares."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, str) or str in kinds:
        return value
    if bool in kinds and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if int in kinds:
        try:
            return int(value)
        except ValueError:
            pass
    if float in kinds:
        try:
            return float(value)
        except ValueError:
            pass
    if dict in kinds or list in kinds:
        import json

        try:
            return json.loads(value)
        except ValueError:
            pass
    return value  # the deployer refuses it, naming the option


class ModelDeployDeploymentClient(BaseDeploymentClient):
    """MLflow deployments through the provider's deployers (see ``target_help()``)."""

    def __init__(self, target_uri: str) -> None:
        super().__init__(target_uri)
        parsed = urlparse(target_uri)
        scheme = parsed.scheme or parsed.path
        if scheme != TARGET:
            raise MlflowException(
                f"target {target_uri!r}: use {TARGET} or {TARGET}:/<conn_id>", INVALID_PARAMETER_VALUE
            )
        self.conn_id = (parsed.path.strip("/") or None) if parsed.scheme else None
        self._deployer: BaseModelDeployer | None = None

    @property
    def deployer(self) -> BaseModelDeployer:
        if self._deployer is None:
            from airflow_provider_modeldeploy.deployers import get_model_deployer

            with _as_mlflow_errors():
                self._deployer = get_model_deployer(self.conn_id)
        return self._deployer

    # -- deployments -----------------------------------------------------------------------------

    def create_deployment(self, name, model_uri, flavor=None, config=None, endpoint=None):
        self._no_endpoint(endpoint)
        return self._create(self.deployer, name, model_uri, flavor, config)

    def _create(
        self, deployer: BaseModelDeployer, name: str, model_uri: str, flavor: str | None, config: dict | None
    ) -> dict[str, Any]:
        self._flavor(flavor)
        with _as_mlflow_errors():
            if self._current(deployer, name, must_exist=False) is not None:
                raise MlflowException(
                    f"deployment {name!r} already exists; `mlflow deployments update` replaces its model in place",
                    RESOURCE_ALREADY_EXISTS,
                )
            service = self._deploy(deployer, name, model_uri, config, replace=False)
        return self._describe(service)

    def update_deployment(self, name, model_uri=None, flavor=None, config=None, endpoint=None):
        self._no_endpoint(endpoint)
        self._flavor(flavor)
        with _as_mlflow_errors():
            current = self._current(self.deployer, name)
            service = self._deploy(
                self.deployer, name, model_uri or current.record.model_uri, config, replace=True,
                defaults={
                    "model_name": current.record.model_name,
                    **{k: v for k, v in current.record.config.items() if k in self.deployer.backend_options},
                },
            )  # fmt: skip
        return self._describe(service)

    def delete_deployment(self, name, config=None, endpoint=None):
        self._no_endpoint(endpoint)
        with _as_mlflow_errors():
            # Idempotent, as MLflow asks: a deployment already gone is not an error.
            for service in self.deployer.find_model_server(endpoint=self._endpoint(name)):
                service.delete(actor=_actor())

    def list_deployments(self, endpoint=None):
        self._no_endpoint(endpoint)
        with _as_mlflow_errors():
            latest: dict[str, Service] = {}
            for service in self.deployer.find_model_server():
                shown = latest.get(service.record.endpoint)
                if shown is None or (service.is_running and not shown.is_running):
                    latest[service.record.endpoint] = service
        return [self._describe(s) for _, s in sorted(latest.items())]

    def get_deployment(self, name, endpoint=None):
        self._no_endpoint(endpoint)
        with _as_mlflow_errors():
            return self._describe(self._current(self.deployer, name))

    def predict(self, deployment_name=None, inputs=None, endpoint=None):
        import httpx

        from airflow_provider_modeldeploy.hooks.tls import default_tls
        from airflow_provider_modeldeploy.masking import mask_text

        self._no_endpoint(endpoint)
        with _as_mlflow_errors():
            service = self._current(self.deployer, deployment_name)
        if not service.is_running:
            raise MlflowException(
                f"deployment {deployment_name!r} is {service.status.state}, not serving "
                f"(`airflow served-models start {service.uuid}`)",
                INVALID_PARAMETER_VALUE,
            )
        try:
            answer = httpx.post(service.prediction_url, json=_scoring_body(inputs), timeout=60, verify=default_tls())
        except httpx.HTTPError as exc:
            raise MlflowException(
                mask_text(f"deployment {deployment_name!r} at {service.prediction_url}: {type(exc).__name__}: {exc}"),
                INTERNAL_ERROR,
            ) from None
        if answer.status_code != 200:
            raise MlflowException(
                mask_text(f"deployment {deployment_name!r} answered HTTP {answer.status_code}: {answer.text[:2000]}"),
                INVALID_PARAMETER_VALUE if answer.status_code < 500 else INTERNAL_ERROR,
            )
        return PredictionsResponse.from_json(answer.text)

    # -- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _no_endpoint(endpoint: str | None) -> None:
        if endpoint is not None:
            raise MlflowException(
                f"--endpoint {endpoint!r}: the {TARGET} target has no endpoints apart from deployments; "
                "name the deployment", INVALID_PARAMETER_VALUE,
            )  # fmt: skip

    @staticmethod
    def _flavor(flavor: str | None) -> None:
        if flavor not in (None, FLAVOR):
            raise MlflowException(
                f"flavor {flavor!r}: the {TARGET} target serves {FLAVOR} only", INVALID_PARAMETER_VALUE
            )

    @staticmethod
    def _endpoint(name: Any) -> str:
        from airflow_provider_modeldeploy.services import validate_name

        return validate_name("name", name)

    def _current(self, deployer: BaseModelDeployer, name: Any, must_exist: bool = True) -> Service | None:
        """The endpoint's serving service (else its latest one): what the deployment is."""
        services = deployer.find_model_server(endpoint=self._endpoint(name))
        current = next((s for s in services if s.is_running), services[0] if services else None)
        if current is None and must_exist:
            raise MlflowException(
                f"no deployment named {name!r} in target {self.target_uri!r}", RESOURCE_DOES_NOT_EXIST
            )
        return current

    def _deploy(
        self,
        deployer: BaseModelDeployer,
        name: str,
        model_uri: str,
        config: dict | None,
        replace: bool,
        defaults: dict[str, Any] | None = None,
    ) -> Service:
        from airflow_provider_modeldeploy.exceptions import InvalidParameterError
        from airflow_provider_modeldeploy.services import Lineage, ServiceConfig

        settings = dict(defaults or {})
        settings.update(config or {})
        timeout = settings.pop("deploy_timeout", 300)
        try:
            timeout = float(timeout)
        except (TypeError, ValueError):
            raise InvalidParameterError("deploy_timeout", timeout, "must be a number of seconds") from None
        model_name = settings.pop("model_name", None) or name
        options = {
            key: _option_value(deployer.backend_options[key], key, value) if key in deployer.backend_options else value
            for key, value in settings.items()
            if key not in _OWN_CONFIG
        }
        return deployer.deploy_model(
            ServiceConfig(model_uri=model_uri, model_name=model_name, endpoint=self._endpoint(name), **options),
            replace=replace, timeout=timeout, lineage=Lineage(actor=_actor()),
        )  # fmt: skip

    @staticmethod
    def _describe(service: Service) -> dict[str, Any]:
        from airflow_provider_modeldeploy.masking import mask

        r = service.record
        return mask({
            "name": r.endpoint, "flavor": FLAVOR, "model_name": r.model_name, "model_uri": r.model_uri,
            "model_version": r.model_version, "model_run_id": r.model_run_id, "state": str(r.state),
            "prediction_url": r.prediction_url, "health_url": r.health_url, "uuid": r.uuid,
            "backend": r.backend, "conn_id": r.conn_id, "last_error": r.last_error,
        })  # fmt: skip


def _scoring_body(inputs: Any) -> Any:
    """MLflow's scoring protocol for what ``predict`` gets: a DataFrame from the CLI, or a payload."""
    if hasattr(inputs, "to_dict") and hasattr(inputs, "columns"):  # a pandas DataFrame
        split: dict[str, Any] = inputs.to_dict(orient="split")
        split.pop("index", None)
        return {"dataframe_split": split}
    if isinstance(inputs, dict) and any(
        k in inputs for k in ("dataframe_split", "dataframe_records", "instances", "inputs")
    ):
        return inputs
    if hasattr(inputs, "tolist"):  # a NumPy array
        inputs = inputs.tolist()
    return {"inputs": inputs}
