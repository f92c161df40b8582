"""The "Try" section of a service's page: a ready-to-paste ``curl`` request for its prediction URL.

The body is MLflow's ``dataframe_split`` format for the model's input columns. They come from the
model's signature, which the model server reads from the MLmodel file when it loads the model and
the deployer records in the endpoint's history (event ``details.inputs``: ``columns``, name and
MLflow type of each, and ``example``, the model's serving input example as JSON): the API server
imports neither MLflow nor the model for it. Values come from the model's input example when it names
every column, else they are placeholders of each column's type. A service whose backend records no
inputs (KServe, Seldon) gets its ``smoke_input`` option as the body, when it has one.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from airflow_provider_modeldeploy.masking import mask, mask_text

#: A value of each MLflow ``DataType`` (mlflow.types.DataType) a model accepts in JSON.
PLACEHOLDERS: dict[str, Any] = {
    "double": 0.0,
    "float": 0.0,
    "integer": 0,
    "long": 0,
    "boolean": False,
    "string": "text",
    "binary": "",
    "datetime": "2024-01-01T00:00:00",
}


def recorded_inputs(uuid: str, history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest ``inputs`` the history holds for this service (history is newest first)."""
    for event in history:
        details = event.get("details") or {}
        if event.get("service_uuid") == uuid and isinstance(details.get("inputs"), dict):
            return details["inputs"]
    return None


def _parsed(example: Any) -> Any:
    if isinstance(example, str):
        try:
            return json.loads(example)
        except ValueError:
            return None
    return example


def _example_row(example: Any, names: list[str]) -> list[Any] | None:
    """The first row of a ``dataframe_split`` / ``dataframe_records`` example, in ``names``' order,
    if it names every column."""
    example = _parsed(example)
    if not isinstance(example, dict):
        return None
    split = example.get("dataframe_split")
    if isinstance(split, dict) and isinstance(split.get("columns"), list) and split.get("data"):
        first = split["data"][0]
        if isinstance(first, list) and len(first) == len(split["columns"]):
            row = dict(zip(split["columns"], first, strict=True))
            if all(name in row for name in names):
                return [row[name] for name in names]
    records = example.get("dataframe_records")
    first_record = records[0] if isinstance(records, list) and records else None
    if isinstance(first_record, dict) and all(name in first_record for name in names):
        return [first_record[name] for name in names]
    return None


def request_body(inputs: dict[str, Any] | None, smoke_input: Any = None) -> tuple[Any, str | None, str]:
    """(body, where it comes from, or a reason when there is no body)."""
    columns = (inputs or {}).get("columns")
    if isinstance(columns, list) and columns and all(isinstance(c, dict) and "name" in c for c in columns):
        names = [str(c["name"]) for c in columns]
        row = _example_row((inputs or {}).get("example"), names)
        source = "the model's signature and input example"
        if row is None:
            row = [PLACEHOLDERS.get(str(c.get("type")), "") for c in columns]
            source = "the model's signature (placeholder values)"
        return {"dataframe_split": {"columns": names, "data": [row]}}, source, ""
    example = _parsed((inputs or {}).get("example"))
    if isinstance(example, dict):
        return example, "the model's input example", ""
    smoke = _parsed(smoke_input)
    if isinstance(smoke, dict | list):
        return smoke, "the service's smoke_input option", ""
    return None, None, "the model's input signature was not recorded when this version was deployed"


def try_section(record: Any, history: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"curl", "body", "columns", "source", "reason"}`` for the detail API, masked."""
    inputs = recorded_inputs(record.uuid, history)
    body, source, reason = request_body(inputs, (record.config or {}).get("smoke_input"))
    columns = [
        {"name": str(c.get("name")), "type": str(c.get("type"))}
        for c in ((inputs or {}).get("columns") or [])
        if isinstance(c, dict)
    ]
    url = record.prediction_url
    if not url:
        reason = reason or "the service has no prediction URL"
    curl = None
    if url and body is not None:
        payload = json.dumps(body, separators=(", ", ": "))
        curl = (
            f"curl -sS -X POST {shlex.quote(url)} \\\n  -H 'Content-Type: application/json' \\\n"
            f"  -d {shlex.quote(payload)}"
        )
    return {
        "curl": mask_text(curl) if curl else None,
        "body": mask(body),
        "columns": mask(columns),
        "source": source,
        "reason": reason or None,
    }
