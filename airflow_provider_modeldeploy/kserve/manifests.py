"""InferenceService objects (``serving.kserve.io/v1beta1``) built from typed models, not templates.

Every manifest is validated against KServe's own CRD schema (tag v0.20.0, shipped with this package)
before it is sent, so that a bad field is reported by its path rather than by the cluster. Which
serving runtime may load what is decided here too (``RUNTIMES``), before anything is sent.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_modeldeploy import crd_schema as crd_schema_module
from airflow_provider_modeldeploy.exceptions import InvalidParameterError

GROUP, VERSION, PLURAL, KIND = "serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService"
#: KServe v0.20.0's config/crd/full/serving.kserve.io_inferenceservices.yaml, the same document as JSON
#: (scripts/vendor_crd.py; source sha256 57c3bf13f77de94678bf2ae3748056ec071ad2b9e88d6a28f44fb4710758fcff).
CRD_PATH = Path(__file__).with_name("serving.kserve.io_inferenceservices.json")
LABEL_PREFIX = "modeldeploy.airflow.apache.org"
MANAGED_LABEL = f"{LABEL_PREFIX}/managed"
SERVICE_LABEL = f"{LABEL_PREFIX}/service-uuid"
LINEAGE_ANNOTATION = f"{LABEL_PREFIX}/lineage"
#: KServe's own annotations and labels.
DEPLOYMENT_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
STOP_ANNOTATION = "serving.kserve.io/stop"
ISVC_POD_LABEL = "serving.kserve.io/inferenceservice"
#: The model server's container in every runtime KServe ships (and the one logs are read from).
MODEL_CONTAINER = "kserve-container"
DEPLOYMENT_MODES = ("Standard", "Knative")
PROTOCOLS = ("v1", "v2")
#: An InferenceService's name becomes a DNS label of its host name and must start with a letter.
_ISVC_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


@dataclass(frozen=True)
class Runtime:
    """A serving runtime and what it can load.

    :param name: the (Cluster)ServingRuntime KServe should use.
    :param model_format: ``modelFormat.name`` it is declared for.
    :param protocols: the protocol versions it speaks.
    :param loads: ``joblib`` (exactly one ``.joblib``/``.pkl``/``.pickle`` file at the top of the
        storage URI, loaded with joblib: KServe's sklearn server) or ``mlflow`` (an MLflow model
        directory, loaded with MLflow: MLServer's MLflow runtime).
    """

    name: str
    model_format: str
    protocols: tuple[str, ...]
    loads: str


#: The runtimes a connection's ``runtime`` extra (or the ``runtime`` backend option) may name.
RUNTIMES: dict[str, Runtime] = {
    "sklearn": Runtime("kserve-sklearnserver", "sklearn", ("v1", "v2"), "joblib"),
    "mlserver": Runtime("kserve-mlserver", "mlflow", ("v2",), "mlflow"),
}
JOBLIB_SUFFIXES = (".joblib", ".pkl", ".pickle")


def check_isvc_name(field_name: str, value: Any) -> str:
    """``value`` if KServe accepts it as an InferenceService (or predictor) name, else an error."""
    if not isinstance(value, str) or len(value) > 63 or not _ISVC_NAME.fullmatch(value):
        raise InvalidParameterError(
            field_name, value,
            "is not a valid InferenceService name (DNS-1123 label starting with a letter: at most 63 "
            "lowercase letters, digits or '-', ending with a letter or digit)",
        )  # fmt: skip
    return value


@dataclass
class Predictor:
    """One predictor: the model, the runtime that loads it and its pods.

    :param name: the predictor's name (v0.20; a canary is promoted by giving its name to the predictor).
    :param storage_uri: where the storage initializer downloads the model from (s3://, gs://, pvc://...).
    :param runtime: the runtime (see ``RUNTIMES``); ``runtime_name`` overrides the ServingRuntime's name.
    :param protocol: ``v1`` or ``v2``.
    :param min_replicas: pods (0 lets Knative scale to zero).
    :param service_account_name: the ServiceAccount carrying the storage credentials.
    :param resources: the model container's resources (Kubernetes quantities), as given.
    :param env: environment of the model container.
    """

    name: str
    storage_uri: str
    runtime: Runtime
    protocol: str = "v1"
    runtime_name: str | None = None
    min_replicas: int = 1
    max_replicas: int | None = None
    service_account_name: str | None = None
    resources: Any = None
    env: dict[str, str] = field(default_factory=dict)
    canary_traffic_percent: int | None = None  # Knative mode only

    def to_dict(self) -> dict[str, Any]:
        model: dict[str, Any] = {
            # The model's container: KServe's default name, which the canary schema requires spelled out.
            "name": MODEL_CONTAINER,
            "modelFormat": {"name": self.runtime.model_format},
            "runtime": self.runtime_name or self.runtime.name,
            "protocolVersion": self.protocol,
            "storageUri": self.storage_uri,
        }
        if self.resources is not None:
            model["resources"] = self.resources
        if self.env:
            model["env"] = [{"name": k, "value": v} for k, v in sorted(self.env.items())]
        out: dict[str, Any] = {"name": self.name, "minReplicas": self.min_replicas, "model": model}
        if self.max_replicas is not None:
            out["maxReplicas"] = self.max_replicas
        if self.service_account_name:
            out["serviceAccountName"] = self.service_account_name
        if self.canary_traffic_percent is not None:
            out["canaryTrafficPercent"] = self.canary_traffic_percent
        return out


@dataclass
class Canary:
    """A Standard-mode canary (v0.20 ``spec.canary[]``): its own predictor and share (0: dark launch)."""

    predictor: Predictor
    traffic_percent: int


@dataclass
class InferenceServiceSpec:
    """A whole InferenceService: metadata carrying the lineage, the predictor and any canary."""

    name: str
    namespace: str
    predictor: Predictor
    deployment_mode: str = "Standard"
    canaries: list[Canary] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"predictor": self.predictor.to_dict()}
        if self.canaries:
            spec["canary"] = [
                {"predictor": c.predictor.to_dict(), "trafficPercent": c.traffic_percent} for c in self.canaries
            ]
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {
                "name": self.name, "namespace": self.namespace, "labels": dict(self.labels),
                "annotations": {**self.annotations, DEPLOYMENT_MODE_ANNOTATION: self.deployment_mode},
            },
            "spec": spec,
        }  # fmt: skip

    def build(self) -> dict[str, Any]:
        """The manifest, after checking names, the runtime / protocol pairing and the CRD schema."""
        check_isvc_name("endpoint", self.name)
        if self.deployment_mode not in DEPLOYMENT_MODES:
            raise InvalidParameterError("deployment_mode", self.deployment_mode, "use 'Standard' or 'Knative'")
        predictors = [self.predictor, *(c.predictor for c in self.canaries)]
        for p in predictors:
            check_isvc_name("predictor", p.name)
            check_runtime_protocol(p.runtime, p.protocol)
        if self.canaries and self.deployment_mode != "Standard":
            raise InvalidParameterError("canary", [c.predictor.name for c in self.canaries], "is Standard mode's")
        if self.predictor.canary_traffic_percent is not None and self.deployment_mode != "Knative":
            raise InvalidParameterError(
                "canaryTrafficPercent", self.predictor.canary_traffic_percent, "is Knative mode's"
            )
        manifest = self.to_dict()
        validate_manifest(manifest)
        return manifest


def check_runtime_protocol(runtime: Runtime, protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise InvalidParameterError("protocol", protocol, "use 'v1' or 'v2'")
    if protocol not in runtime.protocols:
        raise InvalidParameterError(
            "protocol", protocol,
            f"runtime {runtime.name} (modelFormat {runtime.model_format}) speaks only "
            f"{', '.join(runtime.protocols)}; it could not serve this InferenceService",
        )  # fmt: skip


@functools.cache
def crd_schema() -> dict[str, Any]:
    """The openAPIV3Schema of KServe's InferenceService CRD, version v1beta1."""
    return crd_schema_module.load(CRD_PATH, VERSION)


@functools.cache
def _validator() -> Any:
    return crd_schema_module.validator(crd_schema())


def schema_errors(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """(field path, message) for every violation of the CRD schema; empty when valid."""
    return crd_schema_module.errors(_validator(), manifest)


def validate_manifest(manifest: dict[str, Any]) -> None:
    """InvalidParameterError naming the first field the CRD schema rejects."""
    crd_schema_module.check(_validator(), manifest, KIND)
