"""SeldonDeployment objects (``machinelearning.seldon.io/v1``) built from typed models, not templates.

Every manifest is validated against Seldon Core's own CRD schema (release 1.19, shipped with this
package) before it is sent, so a bad field is reported naming the field rather than by the cluster.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_modeldeploy.exceptions import InvalidParameterError
from airflow_provider_modeldeploy.hooks.seldon import IMPLEMENTATIONS, PROTOCOLS, check_dns1123

GROUP, VERSION, PLURAL, KIND = "machinelearning.seldon.io", "v1", "seldondeployments", "SeldonDeployment"
CRD_PATH = Path(__file__).with_name("machinelearning.seldon.io_seldondeployments.yaml")
LABEL_PREFIX = "modeldeploy.airflow.apache.org"
#: Labels (selectable, restricted charset) and annotations (free text) carrying the lineage.
MANAGED_LABEL = f"{LABEL_PREFIX}/managed"
SERVICE_LABEL = f"{LABEL_PREFIX}/service-uuid"
MAIN_PREDICTOR, CANARY_PREDICTOR = "main", "canary"
#: The graph node (and its container): Seldon names the model pods' container, the V2 model
#: (``/v2/models/<node>/infer``) and the storage initializer (``<node>-model-initializer``) after it.
MODEL_NODE = "model"


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

    def to_dict(self) -> dict[str, Any]:
        graph: dict[str, Any] = {
            "name": MODEL_NODE, "type": "MODEL", "implementation": self.implementation,
            "modelUri": self.model_uri, "children": [],
        }  # fmt: skip
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
            "spec": {"protocol": self.protocol, "predictors": [p.to_dict() for p in self.predictors]},
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
    import yaml

    with CRD_PATH.open() as fh:
        crd = yaml.safe_load(fh)
    for version in crd["spec"]["versions"]:
        if version["name"] == VERSION:
            return version["schema"]["openAPIV3Schema"]
    raise RuntimeError(f"{CRD_PATH} has no {VERSION} schema")  # pragma: no cover


def _openapi_to_jsonschema(node: Any) -> Any:
    """Kubernetes' structural-schema extensions mean nothing to jsonschema: translate the ones that
    change validation (int-or-string) and drop the rest."""
    if isinstance(node, list):
        return [_openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _openapi_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


@functools.cache
def _validator() -> Any:
    import jsonschema

    schema = _openapi_to_jsonschema(crd_schema())
    return jsonschema.Draft7Validator(schema)


def schema_errors(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """(field path, message) for every violation of the CRD schema; empty when valid."""
    errors = []
    for error in sorted(_validator().iter_errors(manifest), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in error.absolute_path)
        errors.append((path.replace(".[", "["), error.message))
    return errors


def validate_manifest(manifest: dict[str, Any]) -> None:
    """InvalidParameterError naming the first field the CRD schema rejects."""
    errors = schema_errors(manifest)
    if errors:
        path, message = errors[0]
        value = _lookup(manifest, path)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise InvalidParameterError(
            path or "manifest", value, f"rejected by the SeldonDeployment CRD schema: {message}{more}"
        )


def _lookup(obj: Any, path: str) -> Any:
    import re

    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        try:
            obj = obj[int(part[1:-1])] if part.startswith("[") else obj[part]
        except (KeyError, IndexError, TypeError):
            return None
    return obj
