"""A pandas-free path for the commonest request: plain rows for a scikit-learn model with a column signature.

MLflow's scoring app spends about 1.7 ms of CPU on a single-row request to a small scikit-learn model:
it builds a pandas DataFrame from the JSON, enforces the signature column by column, hands the
request to a thread, and goes through a FastAPI middleware. The model itself needs about 0.1 ms.
This module answers the requests whose answer cannot differ from MLflow's without any of that, and
declines every other request, which then goes through MLflow's app unchanged.

A request is answered here only when all of this holds (else :meth:`FastPath.answer` returns None):

* the model is a ``mlflow.sklearn`` pyfunc with a column signature whose columns are all required
  ``double`` or ``long`` (MLflow passes such a frame to scikit-learn as float64 / int64 columns),
  no params schema, and, where the estimator records the feature names it was fitted with, those
  names are the signature's in the same order (else scikit-learn's own name check decides, in
  MLflow's path);
* the body is small (:data:`MAX_BODY`), UTF-8 JSON of exactly ``{"dataframe_split": {"columns",
  "data"[, "index"]}}`` or ``{"dataframe_records": [...]}``, naming each signature column once and
  nothing else;
* every value is a finite JSON number, and an integer where the column is ``long``.

The estimator then gets the rows as one NumPy array in the signature's column order, with the dtype
the DataFrame would have been converted to, and the answer is formatted by MLflow's own
``predictions_to_json``. ``tests/integration/test_fast_path.py`` checks byte-equal answers against MLflow's app.

Two guards cover estimators that treat a DataFrame differently from an array (a ColumnTransformer
selecting columns by name, a custom step using pandas): the server compares both paths on the
model's input example before serving (:meth:`FastPath.disagreement`) and keeps the fast path off
if they differ, or if the estimator raises on the example as an array. A request on which the
estimator raises later is answered by MLflow's app, that request only: one client cannot turn the
fast path off for everyone.
"""

from __future__ import annotations

import json
import math
import warnings
from io import StringIO
from typing import Any

#: Larger bodies go through MLflow's app: the fast path runs on the event loop, so it stays short.
MAX_BODY = 64 * 1024

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_JSON_TYPES = (b"application/json", b"application/json; charset=utf-8", b"application/json;charset=utf-8")


class FastPath:
    """Answers eligible ``/invocations`` bodies for one loaded pyfunc model."""

    def __init__(self, predict: Any, columns: list[str], kinds: list[str], to_json: Any, log: Any = None) -> None:
        import numpy as np

        self._np = np
        self._predict = predict
        self._columns = columns
        self._index = {name: i for i, name in enumerate(columns)}
        self._integer = [kind == "long" for kind in kinds]
        self._dtype = np.int64 if all(self._integer) else np.float64
        self._to_json = to_json
        self.off_reason: str | None = None
        self.last_rows = 0  # rows of the last request answered (read at once by the caller, on the event loop)
        self._log = log or (lambda _message: None)

    @classmethod
    def for_model(cls, model: Any, log: Any = None) -> FastPath | None:
        """A fast path for this pyfunc model, or None when its requests must all go through MLflow."""
        from mlflow.pyfunc.scoring_server import predictions_to_json
        from mlflow.types.schema import ColSpec, DataType

        flavor = model.metadata.flavors.get("python_function", {})
        if flavor.get("loader_module") != "mlflow.sklearn" or model.metadata.get_params_schema() is not None:
            return None
        schema = model.metadata.get_input_schema()
        if schema is None or not schema.inputs or not schema.has_input_names():
            return None
        kinds = {DataType.double: "double", DataType.long: "long"}
        specs = schema.inputs
        if not all(isinstance(s, ColSpec) and s.required and s.type in kinds for s in specs):
            return None
        columns = [s.name for s in specs]
        if len(set(columns)) != len(columns):
            return None
        estimator = model.get_raw_model()
        fitted = getattr(estimator, "feature_names_in_", None)
        if fitted is not None and [str(name) for name in fitted] != columns:
            return None
        predict = getattr(estimator, flavor.get("predict_fn", "predict"), None)
        if predict is None:
            return None
        # The estimator saw a DataFrame when it was fitted and now gets an array in the same column
        # order (checked above): scikit-learn's warning about it says nothing here.
        warnings.filterwarnings("ignore", message="X does not have valid feature names", category=UserWarning)
        return cls(predict, columns, [kinds[s.type] for s in specs], predictions_to_json, log)

    def disagreement(self, model: Any, serving_input: str) -> str | None:
        """Why this model's requests must not take the fast path, judged on its input example (None:
        both paths give the same answer, or the example is not a request the fast path takes)."""
        from mlflow.pyfunc.scoring_server import invocations

        mine = self.answer(serving_input.encode(), b"application/json", judging=True)
        if self.off_reason is not None:
            return self.off_reason
        if mine is None:
            return None
        schema = model.metadata.get_input_schema()
        try:
            theirs = invocations(serving_input, "application/json", model, schema)
        except Exception as exc:
            return f"MLflow's app failed on the input example ({type(exc).__name__})"
        if theirs.status != 200 or theirs.response.encode() != mine:
            return "the estimator answers the input example differently as an array than as a DataFrame"
        return None

    def answer(self, body: bytes, content_type: bytes | None, *, judging: bool = False) -> bytes | None:
        """The JSON answer MLflow's app would give with status 200, or None to let MLflow's app answer.

        :param judging: this is the model's own input example, checked before serving: an estimator
            that raises on it needs a DataFrame, and the fast path is turned off for good.
        """
        if self.off_reason is not None:
            return None
        if content_type is None or content_type.lower() not in _JSON_TYPES or len(body) > MAX_BODY:
            return None
        try:
            rows = self._rows(json.loads(body))
        except (ValueError, TypeError, RecursionError, UnicodeDecodeError):
            return None
        if rows is None:
            return None
        np = self._np
        try:
            array = np.array(rows, dtype=self._dtype)
        except (OverflowError, ValueError, TypeError):
            return None
        if array.ndim != 2 or array.shape[1] != len(self._columns) or not np.isfinite(array).all():
            return None
        try:
            predictions = self._predict(array)
        except Exception as exc:
            # MLflow's app answers this request (with the estimator's own error, if it raises there too).
            # Only the model's own example may turn the fast path off: one client's rows must not switch
            # it off for everyone.
            if judging:
                self.off_reason = f"the estimator raised on an array: {type(exc).__name__}: {str(exc)[:200]}"
                self._log(f"fast path off: {self.off_reason}")
            return None
        self.last_rows = len(rows)
        out = StringIO()
        self._to_json(predictions, out)
        return out.getvalue().encode()

    def _rows(self, doc: Any) -> list[list[Any]] | None:
        if not isinstance(doc, dict) or len(doc) != 1:
            return None
        if "dataframe_split" in doc:
            split = doc["dataframe_split"]
            if not isinstance(split, dict) or not {"columns", "data"} <= split.keys() <= {"columns", "data", "index"}:
                return None
            order = self._order(split["columns"])
            data = split["data"]
            if order is None or not isinstance(data, list) or not data:
                return None
            if "index" in split and (not isinstance(split["index"], list) or len(split["index"]) != len(data)):
                return None
            rows = []
            for row in data:
                if not isinstance(row, list) or len(row) != len(order):
                    return None
                rows.append([row[i] for i in order])
        elif "dataframe_records" in doc:
            records = doc["dataframe_records"]
            if not isinstance(records, list) or not records:
                return None
            rows = []
            for record in records:
                if not isinstance(record, dict) or record.keys() != self._index.keys():
                    return None
                rows.append([record[name] for name in self._columns])
        else:
            return None
        integer = self._integer
        for row in rows:
            for value, must_be_int in zip(row, integer, strict=True):
                kind = type(value)  # bool is a subclass of int: exact types only
                if kind is int:
                    if not _INT64_MIN <= value <= _INT64_MAX:  # pandas would make it an object column
                        return None
                    continue
                if kind is not float or must_be_int or not math.isfinite(value):
                    return None
        return rows

    def _order(self, columns: Any) -> list[int] | None:
        """Position in the request of each signature column, if the request names each exactly once."""
        if not isinstance(columns, list) or len(columns) != len(self._columns):
            return None
        where = {name: i for i, name in enumerate(columns) if isinstance(name, str)}
        if where.keys() != self._index.keys():
            return None
        return [where[name] for name in self._columns]
