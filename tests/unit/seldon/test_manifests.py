"""seldon/manifests.py: SeldonDeployments built from typed models and checked against Seldon Core's
CRD schema (shipped with the package) before anything reaches a cluster."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from airflow_provider_modeldeploy.exceptions import InvalidParameterError
from airflow_provider_modeldeploy.seldon.manifests import (
    Predictor,
    Resources,
    SeldonDeploymentSpec,
    crd_schema,
    schema_errors,
    validate_manifest,
)


def spec(*predictors: Predictor, **kwargs: Any) -> SeldonDeploymentSpec:
    return SeldonDeploymentSpec(
        name=kwargs.pop("name", "iris"),
        namespace=kwargs.pop("namespace", "models"),
        predictors=list(predictors) or [Predictor(name="main", model_uri="s3://models/iris/1")],
        **kwargs,
    )


def test_a_built_manifest_is_a_valid_seldondeployment() -> None:
    manifest = spec(
        Predictor(name="main", model_uri="s3://models/iris/1", replicas=2, traffic=75, env_secret_ref_name="creds",
                  resources=Resources(requests={"cpu": "500m"}, limits={"memory": "1Gi"})),
        Predictor(name="canary", model_uri="s3://models/iris/2", traffic=25),
        labels={"modeldeploy.airflow.apache.org/managed": "true"}, annotations={"dag": "ct/run/deploy"},
        protocol="v2",
    ).build()  # fmt: skip
    assert manifest["apiVersion"] == "machinelearning.seldon.io/v1" and manifest["kind"] == "SeldonDeployment"
    assert manifest["metadata"] == {
        "name": "iris", "namespace": "models",
        "labels": {"modeldeploy.airflow.apache.org/managed": "true"}, "annotations": {"dag": "ct/run/deploy"},
    }  # fmt: skip
    assert manifest["spec"]["protocol"] == "v2"
    main, canary = manifest["spec"]["predictors"]
    assert (main["name"], main["replicas"], main["traffic"]) == ("main", 2, 75)
    assert main["graph"] == {
        "name": "model", "type": "MODEL", "implementation": "MLFLOW_SERVER", "modelUri": "s3://models/iris/1",
        "children": [], "envSecretRefName": "creds",
    }  # fmt: skip
    container = main["componentSpecs"][0]["spec"]["containers"][0]
    assert container == {"name": "model", "resources": {"requests": {"cpu": "500m"}, "limits": {"memory": "1Gi"}}}
    assert canary["traffic"] == 25 and "envSecretRefName" not in canary["graph"]
    assert schema_errors(manifest) == []


def test_mlflow_server_takes_a_data_frame_in_the_seldon_protocol() -> None:
    """MLFLOW_SERVER (Seldon's MLFlowServer.py, v1.18.2) passes the bare array to the model unless
    ``xtype`` is ``DataFrame``: a model whose signature names columns needs the data frame. MLServer
    (protocol v2) and the other servers take no such parameter."""
    seldon = spec().build()["spec"]["predictors"][0]["graph"]
    assert seldon["parameters"] == [{"name": "xtype", "type": "STRING", "value": "DataFrame"}]
    assert "parameters" not in spec(protocol="v2").build()["spec"]["predictors"][0]["graph"]
    sklearn = Predictor(name="main", model_uri="s3://m/1", implementation="SKLEARN_SERVER")
    assert "parameters" not in spec(sklearn).build()["spec"]["predictors"][0]["graph"]


@pytest.mark.parametrize(
    ("kwargs", "predictors", "field"),
    [
        ({"name": "Iris"}, None, "endpoint"),
        ({"namespace": "my_ns"}, None, "namespace"),
        ({"protocol": "grpc"}, None, "protocol"),
        ({}, [Predictor(name="Main", model_uri="s3://m")], "predictor"),
        ({}, [Predictor(name="main", model_uri="s3://m", implementation="PYTORCH")], "implementation"),
        ({}, [Predictor(name="main", model_uri="s3://m", traffic=90)], "traffic"),
        ({}, [Predictor(name="a", model_uri="s3://m", traffic=50), Predictor(name="a", model_uri="s3://n", traffic=50)],
         "predictors"),
    ],
)  # fmt: skip
def test_bad_values_are_refused_naming_the_field(
    kwargs: dict[str, Any], predictors: list[Predictor] | None, field: str
) -> None:
    with pytest.raises(InvalidParameterError) as info:
        spec(*(predictors or []), **kwargs).build()
    assert info.value.field == field


def test_no_predictor_is_refused() -> None:
    with pytest.raises(InvalidParameterError) as info:
        SeldonDeploymentSpec(name="iris", namespace="models", predictors=[]).build()
    assert info.value.field == "predictors"


def test_the_crd_schema_names_the_field_it_rejects() -> None:
    manifest = spec().build()
    broken = copy.deepcopy(manifest)
    broken["spec"]["predictors"][0]["replicas"] = "two"
    [(path, message)] = schema_errors(broken)
    assert path == "spec.predictors[0].replicas" and "'two' is not of type 'integer'" in message
    with pytest.raises(InvalidParameterError) as info:
        validate_manifest(broken)
    assert info.value.field == "spec.predictors[0].replicas" and info.value.value == "two"
    assert "rejected by the SeldonDeployment CRD schema" in info.value.reason


def test_int_or_string_fields_take_both() -> None:
    """Kubernetes quantities are int-or-string in the CRD: 1 and "1" both pass, a list does not."""
    manifest = spec().build()
    container = manifest["spec"]["predictors"][0]["componentSpecs"][0]["spec"]["containers"][0]
    for value in (1, "500m"):
        container["resources"] = {"limits": {"cpu": value}}
        assert schema_errors(manifest) == []
    container["resources"] = {"limits": {"cpu": [1]}}
    [(path, _)] = schema_errors(manifest)
    assert path == "spec.predictors[0].componentSpecs[0].spec.containers[0].resources.limits.cpu"


def test_the_shipped_crd_is_seldon_cores_v1_schema() -> None:
    schema = crd_schema()
    assert schema["type"] == "object" and "predictors" in schema["properties"]["spec"]["properties"]
    assert "predictors" in schema["properties"]["spec"]["required"]
