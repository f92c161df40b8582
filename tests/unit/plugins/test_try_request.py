"""The detail page's "Try" request: a dataframe_split body from the model's recorded signature."""

from __future__ import annotations

import json
import shlex
from types import SimpleNamespace

from airflow_provider_modeldeploy.plugins.try_request import recorded_inputs, request_body, try_section

COLUMNS = [
    {"name": "sepal length (cm)", "type": "double"},
    {"name": "n", "type": "long"},
    {"name": "ok", "type": "boolean"},
]
UUID = "11111111-0000-4000-8000-000000000001"


def _record() -> SimpleNamespace:
    return SimpleNamespace(uuid=UUID, prediction_url="http://127.0.0.1:5001/invocations", config={})


def test_placeholders_of_each_type_when_there_is_no_example() -> None:
    body, source, reason = request_body({"columns": COLUMNS, "example": None})
    assert body == {"dataframe_split": {"columns": ["sepal length (cm)", "n", "ok"], "data": [[0.0, 0, False]]}}
    assert "placeholder" in source and reason == ""


def test_example_values_in_the_signature_order() -> None:
    example = json.dumps(
        {"dataframe_split": {"columns": ["ok", "n", "sepal length (cm)"], "data": [[True, 3, 5.1], [False, 1, 4.0]]}}
    )
    body, source, _ = request_body({"columns": COLUMNS, "example": example})
    assert body["dataframe_split"]["data"] == [[5.1, 3, True]] and "input example" in source
    records = json.dumps({"dataframe_records": [{"ok": True, "n": 2, "sepal length (cm)": 1.5}]})
    assert request_body({"columns": COLUMNS, "example": records})[0]["dataframe_split"]["data"] == [[1.5, 2, True]]
    # An example missing a column is not used: placeholders instead.
    partial = json.dumps({"dataframe_split": {"columns": ["n"], "data": [[1]]}})
    assert request_body({"columns": COLUMNS, "example": partial})[0]["dataframe_split"]["data"] == [[0.0, 0, False]]


def test_fallbacks_and_reason() -> None:
    assert request_body(None, '{"instances": [[1, 2]]}')[0] == {"instances": [[1, 2]]}
    assert request_body({"columns": None, "example": '{"inputs": [1]}'})[0] == {"inputs": [1]}
    body, source, reason = request_body(None)
    assert body is None and source is None and "signature" in reason


def test_newest_inputs_of_this_service_and_a_curl_that_parses() -> None:
    history = [
        {"service_uuid": "other", "details": {"inputs": {"columns": [{"name": "x", "type": "double"}]}}},
        {"service_uuid": UUID, "details": {"model_uri": "models:/iris/1"}},
        {"service_uuid": UUID, "details": {"inputs": {"columns": COLUMNS}}},
        {"service_uuid": UUID, "details": {"inputs": {"columns": []}}},
    ]
    assert recorded_inputs(UUID, history) == {"columns": COLUMNS}
    section = try_section(_record(), history)
    assert section["reason"] is None and section["columns"] == COLUMNS
    argv = shlex.split(section["curl"].replace("\\\n", " "))
    assert argv[:4] == ["curl", "-sS", "-X", "POST"] and argv[4] == "http://127.0.0.1:5001/invocations"
    assert json.loads(argv[argv.index("-d") + 1]) == section["body"]


def test_no_url_no_curl_and_secrets_masked() -> None:
    section = try_section(SimpleNamespace(uuid=UUID, prediction_url=None, config={}), [])
    assert section["curl"] is None and section["reason"]
    leaky = SimpleNamespace(
        uuid=UUID,
        prediction_url="http://user:hunter2@host:1/invocations",
        config={"smoke_input": {"api_key": "hunter2", "x": 1}},
    )
    section = try_section(leaky, [])
    assert "hunter2" not in json.dumps(section) and section["body"]["x"] == 1
