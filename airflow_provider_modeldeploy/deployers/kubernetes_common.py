"""What both Kubernetes backends' deployers share: exact merge patches, label values, pod readiness,
and the rule that an object this provider did not create for an endpoint is never changed."""

from __future__ import annotations

import re
from typing import Any

from airflow_provider_modeldeploy.exceptions import InvalidParameterError

LABEL_PREFIX = "modeldeploy.airflow.apache.org"
MANAGED_LABEL = f"{LABEL_PREFIX}/managed"
SERVICE_LABEL = f"{LABEL_PREFIX}/service-uuid"


def merge_diff(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns ``old`` into exactly ``new``: keys only ``old``
    has are removed (null), changed objects are diffed, anything else is replaced whole."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = (
                merge_diff(old[key], value) if isinstance(value, dict) and isinstance(old[key], dict) else value
            )
    return patch


def restore_patch(current: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """The merge patch putting ``current`` back to ``before``'s labels, annotations and spec exactly,
    guarded by ``current``'s resourceVersion."""
    meta = {"resourceVersion": current["metadata"]["resourceVersion"]}
    for key in ("labels", "annotations"):
        meta[key] = merge_diff(current["metadata"].get(key) or {}, before["metadata"].get(key) or {})
    return {"metadata": meta, "spec": merge_diff(current.get("spec") or {}, before.get("spec") or {})}


def label_value(value: str) -> str:
    """A label value (63 chars of [-A-Za-z0-9_.], alphanumeric at both ends); the annotation keeps
    the exact value."""
    return re.sub(r"[^-A-Za-z0-9_.]", "_", value)[:63].strip("-_.")


def pod_ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))


def owner(obj: dict[str, Any]) -> str | None:
    """The service uuid of an object this provider created (None for anyone else's)."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return labels.get(SERVICE_LABEL) if labels.get(MANAGED_LABEL) == "true" else None


def check_ours(obj: dict[str, Any] | None, owners: set[str], kind: str, namespace: str) -> None:
    """Never take over what we did not create: ``obj`` must carry our managed label and the uuid of
    one of the endpoint's services (``owners``), else an error naming it; it is left as it is."""
    if obj is None:
        return
    labels = (obj.get("metadata") or {}).get("labels") or {}
    if labels.get(MANAGED_LABEL) == "true" and labels.get(SERVICE_LABEL) in owners:
        return
    name = obj["metadata"]["name"]
    why = (
        f"its service uuid {labels.get(SERVICE_LABEL)} is not in the registry; 'airflow served-models sync' adopts it"
        if labels.get(MANAGED_LABEL) == "true"
        else "not created by this provider"
    )
    raise InvalidParameterError(
        "endpoint", name, f"{kind} {namespace}/{name} exists and is not this endpoint's ({why}); it was left as it "
        "is: choose another endpoint name",
    )  # fmt: skip
