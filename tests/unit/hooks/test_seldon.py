"""hooks/seldon.py: the Seldon connection's settings, and its test against a mocked Kubernetes client."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest

from airflow_provider_modeldeploy.exceptions import InvalidParameterError
from airflow_provider_modeldeploy.hooks.seldon import SeldonDeployerHook, check_dns1123


class Conn:
    def __init__(self, **extra: Any) -> None:
        self.extra_dejson = extra


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    settings = SeldonDeployerHook(connection=Conn()).get_settings()
    assert (settings.namespace, settings.ingress_base_url, settings.implementation, settings.protocol) == (
        "default", "http://127.0.0.1", "MLFLOW_SERVER", "seldon",
    )  # fmt: skip
    assert settings.replicas == 1 and settings.storage_secret is None and settings.tracking_uri == "http://mlflow:5000"


def test_settings_from_extras_and_what_may_be_stored() -> None:
    conn = Conn(namespace="models", ingress_base_url="https://istio.example/", storage_secret="s3-creds",
                implementation="SKLEARN_SERVER", protocol="v2", replicas="3", service_account="sa",
                storage_conn_id="aws_models", tracking_uri="http://mlflow")  # fmt: skip
    settings = SeldonDeployerHook(connection=conn).get_settings()
    assert settings.ingress_base_url == "https://istio.example" and settings.replicas == 3
    assert settings.public() == {
        "namespace": "models", "ingress_base_url": "https://istio.example", "storage_secret": "s3-creds",
        "implementation": "SKLEARN_SERVER", "protocol": "v2", "replicas": 3,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"namespace": "Models"}, "namespace"),
        ({"implementation": "PYTORCH"}, "implementation"),
        ({"protocol": "kfserving"}, "protocol"),
        ({"replicas": 0}, "replicas"),
        ({"replicas": "many"}, "replicas"),
        ({"storage_secret": "Bad_Secret"}, "storage_secret"),
        ({"ingress_base_url": "istio.example"}, "ingress_base_url"),
    ],
)
def test_bad_extras_name_the_field(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        SeldonDeployerHook(connection=Conn(**extra)).get_settings()
    assert info.value.field == field


@pytest.mark.parametrize("name", ["a", "iris", "iris-v2", "0abc", "a" * 63])
def test_dns1123_accepts(name: str) -> None:
    assert check_dns1123("endpoint", name) == name


@pytest.mark.parametrize("name", ["", "Iris", "iris_v2", "-iris", "iris-", "a.b", "a" * 64, None, 3])
def test_dns1123_refuses(name: Any) -> None:
    with pytest.raises(InvalidParameterError) as info:
        check_dns1123("endpoint", name)
    assert info.value.field == "endpoint" and "DNS-1123" in info.value.reason


def test_the_kubernetes_hook_reads_this_connections_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    def no_lookup(conn_id: str) -> None:
        raise AssertionError(f"looked {conn_id} up")

    monkeypatch.setattr(KubernetesHook, "get_connection", no_lookup)
    hook = SeldonDeployerHook(connection=Conn(namespace="models", kube_config_path="/k/config", cluster_context="c1"))
    k8s = hook.kubernetes_hook()
    # KubernetesHook's own reading of its fields, from the connection in hand (never looked up again).
    assert isinstance(k8s, KubernetesHook)
    assert k8s._get_field("kube_config_path") == "/k/config" and k8s._get_field("cluster_context") == "c1"
    assert k8s._get_field("in_cluster") is None
    assert hook.kubernetes_hook() is k8s  # made once


def test_writes_ask_the_api_server_for_strict_field_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    api = mock.Mock()
    hook = SeldonDeployerHook(connection=Conn(namespace="models"))
    monkeypatch.setattr(hook, "custom_objects", lambda: api)
    hook.create_deployment({"metadata": {"name": "iris"}})
    hook.patch_deployment("iris", [{"op": "test", "path": "/spec", "value": {}}], json_patch=True)
    crd = ("machinelearning.seldon.io", "v1", "models", "seldondeployments")  # group, version, namespace, plural
    api.create_namespaced_custom_object.assert_called_once_with(
        *crd, {"metadata": {"name": "iris"}}, field_validation="Strict", _request_timeout=mock.ANY
    )
    api.patch_namespaced_custom_object.assert_called_once_with(
        *crd, "iris", [{"op": "test", "path": "/spec", "value": {}}], field_validation="Strict",
        _content_type="application/json-patch+json", _request_timeout=mock.ANY,
    )  # fmt: skip


def test_a_missing_deployment_reads_as_none_and_other_refusals_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubernetes.client.exceptions import ApiException

    api = mock.Mock()
    hook = SeldonDeployerHook(connection=Conn(namespace="models"))
    monkeypatch.setattr(hook, "custom_objects", lambda: api)
    api.get_namespaced_custom_object.side_effect = ApiException(status=404, reason="Not Found")
    assert hook.get_deployment("iris") is None
    api.get_namespaced_custom_object.side_effect = ApiException(status=403, reason="Forbidden")
    with pytest.raises(ApiException):
        hook.get_deployment("iris")


def test_connection_test_lists_seldondeployments_in_the_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    api = mock.Mock()
    hook = SeldonDeployerHook(connection=Conn(namespace="models"))
    monkeypatch.setattr(hook, "custom_objects", lambda: api)
    assert hook.test_connection() == (True, "SeldonDeployments readable in namespace models")
    api.list_namespaced_custom_object.assert_called_once_with(
        "machinelearning.seldon.io", "v1", "models", "seldondeployments", limit=1, _request_timeout=mock.ANY
    )


def test_connection_test_reports_the_apis_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubernetes.client.exceptions import ApiException

    api = mock.Mock()
    api.list_namespaced_custom_object.side_effect = ApiException(status=403, reason="Forbidden")
    hook = SeldonDeployerHook(connection=Conn(namespace="models"))
    monkeypatch.setattr(hook, "custom_objects", lambda: api)
    ok, message = hook.test_connection()
    assert not ok and message.startswith("ApiException: (403)") and "Forbidden" in message
    ok, message = SeldonDeployerHook(connection=Conn(namespace="Bad")).test_connection()
    assert not ok and message.startswith("InvalidParameterError: namespace='Bad'")
