"""SeldonDeployment objects (``machinelearning.seldon.io/v1``) built from typed models, not templates.

Every manifest is validated against Seldon Core's own CRD schema (release 1.19, shipped with this
package) before it is sent, so a bad field is reported naming the field rather than by the cluster.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_modeldeploy import crd_schema as crd_schema_module
from airflow_provider_modeldeploy.exceptions import InvalidParameterError
from airflow_provider_modeldeploy.hooks.seldon import CRD, IMPLEMENTATIONS, PROTOCOLS, check_dns1123

(GROUP, VERSION, PLURAL), KIND = CRD, "SeldonDeployment"
#: Seldon Core 1.19's machinelearning.seldon.io_seldondeployments.yaml, the same document as JSON
#: (scripts/vendor_crd.py; source sha256 94286c86a405436eb5aa1a15e229d00eea60a5dcd9b9e87550a07ec10242ff6a).
CRD_PATH = Path(__file__).with_name("machinelearning.seldon.io_seldondeployments.json")
LABEL_PREFIX = "modeldeploy.airflow.apache.org"
#: Labels (selectable, restricted charset) and annotations (free text) carrying the lineage.
MANAGED_LABEL = f"{LABEL_PREFIX}/managed"
SERVICE_LABEL = f"{LABEL_PREFIX}/service-uuid"
MAIN_PREDICTOR, CANARY_PREDICTOR = "main", "canary"
#: The graph node (and its container): Seldon names the model pods' container, the V2 model
#: (``/v2/models/<node>/infer``) and the storage initializer (``<node>-model-initializer``) after it.
MODEL_NODE = "model"
#: Seldon Core 1's MLFLOW_SERVER (servers/mlflowserver/mlflowserver/MLFlowServer.py, v1.18.2) calls
#: the model with the request's bare array unless its ``xtype`` parameter is ``DataFrame``; then it
#: builds ``pd.DataFrame(X, columns=names)`` from the request's ``data.names``. An MLflow model whose
#: signature names columns refuses the bare array ("Model is missing inputs"), so the provider asks
#: for the data frame (a model without a signature takes either).
MLFLOW_XTYPE = {"name": "xtype", "type": "STRING", "value": "DataFrame"}


@dataclass
class Resources:
    """Container resources, Kubernetes quantities such as ``"500m"`` or ``"1Gi"``."""

    requests: dict[str, str] = field(default_factory=dict)
    limits: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.requests:
            out["requests"] = dict(self.requests)
        if self.limits:
            out["limits"] = dict(self.limits)
        return out


@dataclass
class Predictor:
    """One predictor of a SeldonDeployment: a prepackaged model server and its share of traffic.

    :param name: predictor name (DNS-1123).
    :param model_uri: storage URI the Seldon storage initializer downloads (s3://, gs://, file://...).
    :param implementation: one of the prepackaged servers (MLFLOW_SERVER, SKLEARN_SERVER, ...).
    :param replicas: pods of this predictor (0: scaled down).
    :param traffic: percent of the deployment's traffic.
    :param env_secret_ref_name: Secret with the storage credentials (rclone environment variables).
    :param service_account_name: service account of the model pods.
    :param resources: container resources of the model server.
    """

    name: str
    model_uri: str
    implementation: str = "MLFLOW_SERVER"
    replicas: int = 1
    traffic: int = 100
    env_secret_ref_name: str | None = None
    service_account_name: str | None = None
    resources: Resources | None = None
    labels: dict[str, str] = field(default_factory=dict)

    def to_dict(self, protocol: str = "seldon") -> dict[str, Any]:
        graph: dict[str, Any] = {
            "name": MODEL_NODE, "type": "MODEL", "implementation": self.implementation,
            "modelUri": self.model_uri, "children": [],
        }  # fmt: skip
        if protocol == "seldon" and self.implementation == "MLFLOW_SERVER":
            graph["parameters"] = [dict(MLFLOW_XTYPE)]
        if self.env_secret_ref_name:
            graph["envSecretRefName"] = self.env_secret_ref_name
        if self.service_account_name:
            graph["serviceAccountName"] = self.service_account_name
        out: dict[str, Any] = {
            "name": self.name, "replicas": self.replicas, "traffic": self.traffic, "graph": graph,
            "componentSpecs": [{"spec": {"containers": [{"name": MODEL_NODE, **(
                {"resources": self.resources.to_dict()} if self.resources else {})}]}}],
        }  # fmt: skip
        if self.labels:
            out["labels"] = dict(self.labels)
        return out


@dataclass
class SeldonDeploymentSpec:
    """A whole SeldonDeployment: metadata carrying the lineage, and its predictors."""

    name: str
    namespace: str
    predictors: list[Predictor]
    protocol: str = "seldon"
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {
                "name": self.name, "namespace": self.namespace,
                "labels": dict(self.labels), "annotations": dict(self.annotations),
            },
            "spec": {"protocol": self.protocol, "predictors": [p.to_dict(self.protocol) for p in self.predictors]},
        }  # fmt: skip

    def build(self) -> dict[str, Any]:
        """The manifest, after checking names (DNS-1123), values and the CRD schema."""
        check_dns1123("endpoint", self.name)
        check_dns1123("namespace", self.namespace)
        if self.protocol not in PROTOCOLS:
            raise InvalidParameterError("protocol", self.protocol, "use 'seldon' or 'v2'")
        names = [p.name for p in self.predictors]
        if len(set(names)) != len(names) or not names:
            raise InvalidParameterError("predictors", names, "need at least one, with distinct names")
        for p in self.predictors:
            check_dns1123("predictor", p.name)
            if p.implementation not in IMPLEMENTATIONS:
                raise InvalidParameterError(
                    "implementation", p.implementation, f"use one of {', '.join(IMPLEMENTATIONS)}"
                )
        if sum(p.traffic for p in self.predictors) != 100:
            raise InvalidParameterError("traffic", [p.traffic for p in self.predictors], "must add up to 100")
        manifest = self.to_dict()
        validate_manifest(manifest)
        return manifest


@functools.cache
def crd_schema() -> dict[str, Any]:
    """The openAPIV3Schema of Seldon Core's SeldonDeployment CRD, version v1."""
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
