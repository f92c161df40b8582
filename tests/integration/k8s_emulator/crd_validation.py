"""How the emulated API server checks a custom resource against its CRD, independently of the
provider's own check (``airflow_provider_modeldeploy.crd_schema``), so that a 400 or 422 from the
emulator can disagree with the deployer.

The two steps of a real API server (k8s.io/apiextensions-apiserver, Kubernetes >= 1.27), in order:

1. Decoding with ``fieldValidation`` (``Strict``, ``Warn`` when the request names none, or
   ``Ignore``): a field the structural schema does not declare (outside
   ``x-kubernetes-preserve-unknown-fields``) is a 400 ``strict decoding error: unknown field "p"``
   under Strict; otherwise it is pruned from the object, with a ``Warning: 299`` header under Warn.
2. Validation of what is left against ``openAPIV3Schema`` as OpenAPI 3.0 reads it: here by the
   third-party ``openapi-schema-validator`` (OAS 3.0: ``nullable``, ``anyOf`` int-or-string as the
   CRD writes it), on the schema exactly as the CRD file has it, never the provider's translation.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

#: plural -> (the CRD file shipped with the package, kind, group); the files are upstream's own CRDs, as JSON.
CRDS = {
    "seldondeployments": (
        "seldon/machinelearning.seldon.io_seldondeployments.json", "SeldonDeployment", "machinelearning.seldon.io"
    ),
    "inferenceservices": ("kserve/serving.kserve.io_inferenceservices.json", "InferenceService", "serving.kserve.io"),
}  # fmt: skip
ROOT_FIELDS = ("apiVersion", "kind", "metadata")


class Rejected(Exception):
    """The API server's answer: ``code`` (400 strict decoding, 422 invalid) and its message."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


@functools.cache
def _schema(plural: str, version: str) -> dict[str, Any]:
    import airflow_provider_modeldeploy

    relative = CRDS[plural][0]
    path = Path(airflow_provider_modeldeploy.__file__).parent / relative
    with path.open(encoding="utf-8") as fh:
        crd = json.load(fh)
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            return served["schema"]["openAPIV3Schema"]
    raise Rejected(404, "NotFound", f"the server could not find the requested resource (version {version})")


@functools.cache
def _validator(plural: str, version: str) -> Any:
    from openapi_schema_validator import OAS30Validator

    return OAS30Validator(_schema(plural, version))


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths of the fields in ``obj`` that the structural schema does not declare."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            child = f"{path}.{key}" if path else key
            if not path and key in ROOT_FIELDS:
                continue  # ObjectMeta and the type fields: the API server's own, not the CRD's
            if props is not None and key in props:
                found += unknown_fields(value, props[key], child)
            elif isinstance(extra, dict):
                found += unknown_fields(value, extra, child)
            elif props is not None and extra is None:
                found.append(child)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def _prune(obj: Any, schema: dict[str, Any], path: str, unknown: set[str]) -> Any:
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            child = f"{path}.{key}" if path else key
            if child in unknown:
                continue
            props = schema.get("properties") or {}
            sub = props.get(key) or (schema.get("additionalProperties") if isinstance(
                schema.get("additionalProperties"), dict) else {})  # fmt: skip
            out[key] = value if (not path and key in ROOT_FIELDS) else _prune(value, sub or {}, child, unknown)
        return out
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [_prune(item, schema["items"], f"{path}[{i}]", unknown) for i, item in enumerate(obj)]
    return obj


def admit(plural: str, obj: dict[str, Any], field_validation: str | None) -> tuple[dict[str, Any], list[str]]:
    """The object as the API server stores it and the warnings it answers with; Rejected otherwise."""
    version = str(obj.get("apiVersion", "")).rpartition("/")[2]
    schema = _schema(plural, version)
    _, kind, group = CRDS[plural]
    mode = field_validation or "Warn"
    if mode not in ("Strict", "Warn", "Ignore"):
        raise Rejected(400, "BadRequest", f'invalid fieldValidation "{mode}": must be Ignore, Warn or Strict')
    # With the status subresource (both CRDs), a write to the object itself keeps the stored status
    # and neither decodes nor validates the one it carries.
    status = obj.get("status")
    obj = {k: v for k, v in obj.items() if k != "status"}
    unknown = unknown_fields(obj, schema)
    if unknown and mode == "Strict":
        listed = ", ".join(f'unknown field "{p}"' for p in unknown)
        raise Rejected(
            400,
            "BadRequest",
            f'{kind} in version "{version}" cannot be handled as a {kind}: strict decoding error: {listed}',
        )
    warnings = [f'unknown field "{p}"' for p in unknown] if mode == "Warn" else []
    stored = _prune(obj, schema, "", set(unknown)) if unknown else obj
    errors = sorted(_validator(plural, version).iter_errors(stored), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        name = (stored.get("metadata") or {}).get("name")
        detail = "; ".join(
            f"{_path(e.absolute_path)}: Invalid value: {_short(e.instance)}: {e.message}" for e in errors
        )
        raise Rejected(422, "Invalid", f'{kind}.{group} "{name}" is invalid: {detail}')
    if status is not None:
        stored = {**stored, "status": status}
    return stored, warnings


def _path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def _short(value: Any) -> str:
    import json

    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
