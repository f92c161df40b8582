"""A CustomResourceDefinition's ``openAPIV3Schema`` as the Kubernetes API server applies it, for
checking a manifest before it is sent (Seldon's and KServe's CRDs ship with this package).

jsonschema knows nothing of OpenAPI 3.0 or of Kubernetes' structural-schema extensions, so the schema
is translated for it, each rule as the API server has it:

- ``nullable: true``: null is a valid value (``creationTimestamp: null``, as Go clients write it);
- ``x-kubernetes-int-or-string``: an integer or a string;
- unknown fields: the deployers send with ``fieldValidation=Strict``, where the API server answers
  400 for a field its schema does not declare instead of dropping it silently, so an object node
  with ``properties`` rejects other keys unless it says ``x-kubernetes-preserve-unknown-fields`` or
  has ``additionalProperties``;
- other ``x-kubernetes-*`` keys do not change what is valid and are dropped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from airflow_provider_modeldeploy.exceptions import InvalidParameterError

#: The query parameter sent with every create and patch (kubernetes client: ``field_validation``).
FIELD_VALIDATION = "Strict"


def load(path: Path, version: str) -> dict[str, Any]:
    """The ``openAPIV3Schema`` of ``version`` in the CRD file at ``path`` (upstream's CRD as JSON:
    scripts/vendor_crd.py; read in milliseconds, where the 2 MB of YAML took a second per process)."""
    with path.open(encoding="utf-8") as fh:
        crd = json.load(fh)
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            return served["schema"]["openAPIV3Schema"]
    raise RuntimeError(f"{path} has no {version} schema")  # pragma: no cover


def to_jsonschema(node: Any) -> Any:
    """The OpenAPI v3 / structural schema ``node`` as a JSON Schema (draft 7) with the same verdicts."""
    if isinstance(node, list):
        return [to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    preserves = node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in node and "additionalProperties" not in node and not preserves:
        out["additionalProperties"] = False
    if node.get("nullable"):
        out = {"anyOf": [{"type": "null"}, out]}
    return out


def validator(schema: dict[str, Any]) -> Any:
    import jsonschema

    return jsonschema.Draft7Validator(to_jsonschema(schema))


def errors(checker: Any, manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """(field path, message) for every violation, in path order; empty when valid."""
    found = []
    for error in sorted(checker.iter_errors(manifest), key=lambda e: [str(p) for p in e.absolute_path]):
        path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in error.absolute_path)
        found.append((path.replace(".[", "["), error.message))
    return found


def check(checker: Any, manifest: dict[str, Any], kind: str) -> None:
    """InvalidParameterError naming the first field the CRD schema rejects, with its value."""
    found = errors(checker, manifest)
    if found:
        path, message = found[0]
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise InvalidParameterError(
            path or "manifest", lookup(manifest, path), f"rejected by the {kind} CRD schema: {message}{more}"
        )


def lookup(obj: Any, path: str) -> Any:
    """The value at a dotted path with ``[i]`` indexes (None where there is none)."""
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        try:
            obj = obj[int(part[1:-1])] if part.startswith("[") else obj[part]
        except (KeyError, IndexError, TypeError):
            return None
    return obj
