"""The provider's CRD check (``airflow_provider_modeldeploy.crd_schema``) against the emulated API
server's (``k8s_emulator.crd_validation``: openapi-schema-validator over the CRD as shipped, and
Kubernetes' strict decoding of unknown fields). Each case is a manifest the provider builds, changed
where the two readings of the schema could part: int-or-string quantities, ``nullable``,
``x-kubernetes-preserve-unknown-fields``, unknown fields, enums and types. The provider must refuse
exactly what the API server refuses (else a deploy fails late, on the cluster) and accept exactly
what it accepts (else a valid manifest is refused before it is sent). No processes: in-process.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from k8s_emulator import crd_validation

from airflow_provider_modeldeploy.kserve import manifests as km
from airflow_provider_modeldeploy.seldon import manifests as sm


def seldon_manifest() -> dict[str, Any]:
    predictor = sm.Predictor(name="main", model_uri="s3://models/iris/1", resources=sm.Resources({"cpu": "500m"}))
    return sm.SeldonDeploymentSpec(name="iris", namespace="models", predictors=[predictor]).build()


def kserve_manifest() -> dict[str, Any]:
    predictor = km.Predictor(name="main", storage_uri="s3://models/iris/1", runtime=km.RUNTIMES["sklearn"],
                             resources={"requests": {"cpu": "500m"}})  # fmt: skip
    return km.InferenceServiceSpec(name="iris", namespace="models", predictor=predictor).build()


def put(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change setting ``path`` (dots; ``[i]`` for list items) to ``value``."""

    def change(obj: dict[str, Any]) -> None:
        parts = path.replace("[", ".[").split(".")
        for part in parts[:-1]:
            obj = obj[int(part[1:-1])] if part.startswith("[") else obj.setdefault(part, {})
        obj[parts[-1]] = value

    return change


SELDON_CONTAINER = "spec.predictors[0].componentSpecs[0].spec.containers[0]"
SELDON_CASES = {
    # (change, the API server's verdict: "ok", 400 strict decoding, 422 invalid)
    "as built": (lambda obj: None, "ok"),
    "int quantity": (put(f"{SELDON_CONTAINER}.resources.requests", {"cpu": 1}), "ok"),
    "string quantity": (put(f"{SELDON_CONTAINER}.resources.limits", {"memory": "1Gi"}), "ok"),
    "float quantity": (put(f"{SELDON_CONTAINER}.resources.requests", {"cpu": 0.5}), 422),
    "quantity not a map": (put(f"{SELDON_CONTAINER}.resources.requests", "lots"), 422),
    # Go clients write a pod template's creationTimestamp as null: nullable in Seldon's CRD.
    "nullable creationTimestamp": (
        put("spec.predictors[0].componentSpecs[0].metadata", {"creationTimestamp": None}),
        "ok",
    ),
    "null where not nullable": (put("spec.predictors[0].replicas", None), 422),
    "replicas as a string": (put("spec.predictors[0].replicas", "two"), 422),
    "unknown predictor field": (put("spec.predictors[0].replica", 2), 400),
    "unknown container field": (put(f"{SELDON_CONTAINER}.resource", {"cpu": "1"}), 400),
    "unknown graph field": (put("spec.predictors[0].graph.modelUrl", "s3://x"), 400),
    "graph type not a string": (put("spec.predictors[0].graph.type", 3), 422),
    "free-form labels": (put("spec.predictors[0].labels", {"team": "fraud"}), "ok"),
}
KSERVE_CASES = {
    "as built": (lambda obj: None, "ok"),
    "int quantity": (put("spec.predictor.model.resources.limits", {"cpu": 2}), "ok"),
    "float quantity": (put("spec.predictor.model.resources.limits", {"cpu": 0.5}), 422),
    "minReplicas as a string": (put("spec.predictor.minReplicas", "two"), 422),
    "unknown predictor field": (put("spec.predictor.minReplica", 2), 400),
    "unknown model field": (put("spec.predictor.model.storageURI", "s3://x"), 400),
    "int-or-string port name": (put("spec.predictor.model.ports", [{"containerPort": 8080, "name": "http1"}]), "ok"),
    "canary with a bad share": (put("spec.predictor.canaryTrafficPercent", "ten"), 422),
}


def provider_verdict(kind: str, obj: dict[str, Any]) -> Any:
    errors = (sm if kind == "seldon" else km).schema_errors(obj)
    if not errors:
        return "ok"
    # The provider has one verdict, a refusal naming the field; the API server's has two codes.
    return "refused"


def server_verdict(kind: str, obj: dict[str, Any]) -> Any:
    plural = "seldondeployments" if kind == "seldon" else "inferenceservices"
    try:
        crd_validation.admit(plural, obj, "Strict")
    except crd_validation.Rejected as exc:
        return exc.code
    return "ok"


@pytest.mark.parametrize(
    ("kind", "case"), [("seldon", c) for c in SELDON_CASES] + [("kserve", c) for c in KSERVE_CASES]
)
def test_the_provider_refuses_exactly_what_the_api_server_refuses(kind: str, case: str) -> None:
    change, expected = (SELDON_CASES if kind == "seldon" else KSERVE_CASES)[case]
    obj = copy.deepcopy(seldon_manifest() if kind == "seldon" else kserve_manifest())
    change(obj)
    assert server_verdict(kind, obj) == expected, "the emulated API server's verdict (its own reading of the CRD)"
    assert provider_verdict(kind, obj) == ("ok" if expected == "ok" else "refused")


def test_warn_prunes_unknown_fields_and_says_so() -> None:
    obj = seldon_manifest()
    obj["spec"]["predictors"][0]["replica"] = 2
    obj["spec"]["predictors"][0]["graph"]["modelUrl"] = "s3://x"
    stored, warnings = crd_validation.admit("seldondeployments", obj, None)  # no fieldValidation: Warn
    assert warnings == [
        'unknown field "spec.predictors[0].graph.modelUrl"',
        'unknown field "spec.predictors[0].replica"',
    ]
    assert (
        "replica" not in stored["spec"]["predictors"][0] and "modelUrl" not in stored["spec"]["predictors"][0]["graph"]
    )
    assert stored["spec"]["predictors"][0]["replicas"] == 1
    stored, warnings = crd_validation.admit("seldondeployments", obj, "Ignore")
    assert warnings == [] and "replica" not in stored["spec"]["predictors"][0]


def test_status_is_the_subresources_and_kept_as_stored() -> None:
    """Both CRDs have the status subresource: a write of the object neither checks nor decodes the
    status it carries (KServe's preserves unknown fields anyway)."""
    obj = kserve_manifest()
    obj["status"] = {"anything": {"the": "controller wrote"}, "url": 3}
    stored, _ = crd_validation.admit("inferenceservices", obj, "Strict")
    assert stored["status"] == obj["status"]


def test_the_provider_names_the_unknown_field() -> None:
    from airflow_provider_modeldeploy.exceptions import InvalidParameterError

    obj = kserve_manifest()
    obj["spec"]["predictor"]["minReplica"] = 2
    with pytest.raises(InvalidParameterError) as info:
        km.validate_manifest(obj)
    assert info.value.field == "spec.predictor" and "'minReplica' was unexpected" in str(info.value)
