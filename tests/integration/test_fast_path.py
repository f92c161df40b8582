"""The fast path answers exactly as MLflow does, and declines whatever it cannot answer so.

The reference is MLflow itself. The model most cases use (iris) is served by a real ``mlflow models
serve`` (its own CLI and server, over HTTP); the other models, asked once or twice each, are answered by
the app that command runs (``scoring_server.init`` on MLflow's own load of the saved model), in this
process, which spares a server process per model. Every payload goes to the model server's app as a
model server builds it (``_build_app``, fast path on, in this process so the test can count what the
fast path took) and to MLflow; status, content type and body must be identical, and the fast path must
have answered every payload it is meant to take. Where the two differ on purpose (no Content-Type), the
test says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from local_http import HTTP

mlflow = pytest.importorskip("mlflow")

from airflow_provider_modeldeploy.serving import fast_path, mlflow_server  # noqa: E402

IRIS_COLUMNS = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]
SERVED = {"iris"}  # the saved models a real `mlflow models serve` answers for (the others: its app, in process)


def save(tmp: Path, name: str, model: Any, example: Any, **kwargs: Any) -> Any:
    """The model saved by MLflow, then loaded as a model server loads it."""
    import mlflow.sklearn

    path = tmp / name
    # The flavor's default requirements, given: inferring them loads the model again in a subprocess.
    kwargs.setdefault("pip_requirements", mlflow.sklearn.get_default_pip_requirements())
    mlflow.sklearn.save_model(model, str(path), input_example=example, **kwargs)
    loaded = mlflow.pyfunc.load_model(str(path))
    loaded._modeldeploy_path = str(path)  # where mlflow models serve reads it from
    return loaded


Answer = tuple[int, str | None, bytes]  # status, content type, body: what the tests compare


@pytest.fixture(scope="module")
def mlflow_reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[Any, bytes, str | None], Answer]]:
    """MLflow's answer to one request for a saved model: over HTTP from a real ``mlflow models serve``
    for the models in SERVED (started once on first use, stopped by its process group at the end),
    else from the app that command builds, in this process."""
    import subprocess
    import sys

    import httpx
    from conftest import wait_for
    from mlflow.pyfunc import scoring_server

    logs = tmp_path_factory.mktemp("mlflow-serve")
    started: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    apps: dict[str, Any] = {}

    def answer(model: Any, body: bytes, content_type: str | None) -> Answer:
        path = model._modeldeploy_path
        if Path(path).name not in SERVED:
            if path not in apps:  # what mlflow.pyfunc.scoring_server.app does with the served path
                apps[path] = scoring_server.init(scoring_server.load_model_with_mlflow_config(path))
            # An exception in MLflow's app is its server's bare 500, as uvicorn would answer it.
            return asyncio.run(_post(apps[path], body, content_type, raise_app_exceptions=False))
        headers = {"content-type": content_type} if content_type else {}
        reply = HTTP.post(f"{url(path)}/invocations", content=body, headers=headers, timeout=120)
        return reply.status_code, reply.headers.get("content-type"), reply.content

    def url(path: str) -> str:
        if path not in started:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            logfile = logs / f"{len(started)}.log"
            with logfile.open("wb") as log:  # the child writes to its own copy of the descriptor
                proc = subprocess.Popen(
                    [sys.executable, "-m", "mlflow", "models", "serve", "-m", path, "--env-manager", "local",
                     "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    # mlflow execs ``uvicorn`` by name: the venv's, as an activated venv would find it.
                    env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
                )  # fmt: skip
            started[path] = (proc, f"http://127.0.0.1:{port}")

            def up() -> bool:
                assert proc.poll() is None, logfile.read_text()[-3000:]
                try:
                    return HTTP.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(up, 180, f"mlflow models serve of {path}")
        return started[path][1]

    yield answer
    for proc, _ in started.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc, _ in started.values():
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import numpy as np
    import pandas as pd
    from sklearn.datasets import load_diabetes, load_iris
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tmp = tmp_path_factory.mktemp("fast-path-models")
    X, y = load_iris(return_X_y=True, as_frame=True)
    counts = pd.DataFrame({"a": (X.iloc[:, 0] * 10).astype("int64"), "b": (X.iloc[:, 2] * 10).astype("int64")})
    mixed = pd.DataFrame({"length": X.iloc[:, 0], "petals": (X.iloc[:, 2] * 10).astype("int64")})
    d, t = load_diabetes(return_X_y=True, as_frame=True)
    return {
        "iris": save(tmp, "iris", LogisticRegression(max_iter=500).fit(X, y), X.head(2)),
        "pipeline_proba": save(
            tmp,
            "proba",
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y),
            X.head(2),
            pyfunc_predict_fn="predict_proba",
        ),
        "long_columns": save(tmp, "long", GaussianNB().fit(counts, y), counts.head(2)),
        "mixed_columns": save(tmp, "mixed", LogisticRegression(max_iter=500).fit(mixed, y), mixed.head(2)),
        "regressor": save(tmp, "regressor", LinearRegression().fit(d, t), d.head(2)),
        # Fitted on an array, so scikit-learn knows no feature names; the signature still has columns.
        "no_feature_names": save(tmp, "nonames", LogisticRegression(max_iter=500).fit(X.to_numpy(), y), X.head(2)),
        # A tensor signature: never taken by the fast path.
        "tensor": save(tmp, "tensor", LogisticRegression(max_iter=500).fit(X.to_numpy(), y), np.zeros((1, 4))),
    }


class Spy:
    """Counts the requests the fast path answered (not None) and declined."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.answered = self.declined = 0
        original = fast_path.FastPath.answer

        def answer(path: fast_path.FastPath, body: bytes, content_type: bytes | None) -> bytes | None:
            result = original(path, body, content_type)
            if result is None:
                self.declined += 1
            else:
                self.answered += 1
            return result

        monkeypatch.setattr(fast_path.FastPath, "answer", answer)


async def _post(app: Any, body: bytes, content_type: str | None, raise_app_exceptions: bool = True) -> Answer:
    import httpx

    headers = {"content-type": content_type} if content_type else {}
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    async with httpx.AsyncClient(transport=transport, base_url="http://model") as client:
        answer = await client.post("/invocations", content=body, headers=headers)
    return answer.status_code, answer.headers.get("content-type"), answer.content


_EXTRA_INPUTS = re.compile(rb"(extra inputs: \[)((?:'(?:[^'\\]|\\.)*'(?:, )?)+)(\])")


def same_set_order(answer: tuple[int, str | None, bytes]) -> tuple[int, str | None, bytes]:
    """MLflow's schema error lists the unexpected inputs of a set, in an order that differs from one
    process to the next (string hashing is randomized per process): sorted, so that two processes'
    answers compare."""
    status, content_type, body = answer

    def sort(found: re.Match[bytes]) -> bytes:
        items = re.findall(rb"'(?:[^'\\]|\\.)*'", found.group(2))
        return found.group(1) + b", ".join(sorted(items)) + found.group(3)

    return status, content_type, _EXTRA_INPUTS.sub(sort, body)


@pytest.fixture
def both(mlflow_reference: Callable[[Any, bytes, str | None], Answer]) -> Callable[..., tuple[Any, Any]]:
    """(the model server's answer, MLflow's answer) to one request."""

    def ask(model: Any, body: bytes | str | dict, content_type: str | None = "application/json") -> tuple[Any, Any]:
        raw = (
            json.dumps(body).encode() if isinstance(body, dict) else body if isinstance(body, bytes) else body.encode()
        )
        fast = mlflow_server._build_app(model, {}, fast_path=True)
        ours, mlflows = asyncio.run(_post(fast, raw, content_type)), mlflow_reference(model, raw, content_type)
        return same_set_order(ours), same_set_order(mlflows)

    return ask


def split(columns: list[str], rows: list[list[Any]], **extra: Any) -> dict[str, Any]:
    return {"dataframe_split": {"columns": columns, "data": rows, **extra}}


def iris_rows(n: int, seed: int) -> list[list[float]]:
    rnd = random.Random(seed)
    return [[round(rnd.uniform(0.1, 8.0), rnd.choice([1, 2, 6, 15])) for _ in range(4)] for _ in range(n)]


TAKEN = {
    "one row": split(IRIS_COLUMNS, [[5.1, 3.5, 1.4, 0.2]]),
    "ten random rows": split(IRIS_COLUMNS, iris_rows(10, 1)),
    "integers in double columns": split(IRIS_COLUMNS, [[5, 3, 1, 0], [7, 3, 5, 2]]),
    "columns in another order": split(IRIS_COLUMNS[::-1], [r[::-1] for r in iris_rows(3, 2)]),
    "with an index": split(IRIS_COLUMNS, iris_rows(2, 3), index=[7, 8]),
    "records": {"dataframe_records": [dict(zip(IRIS_COLUMNS, r, strict=True)) for r in iris_rows(3, 4)]},
    "extreme but finite": split(IRIS_COLUMNS, [[1e300, -1e300, 5e-324, 0.0]]),
}

DECLINED = {
    "a boolean": split(IRIS_COLUMNS, [[True, 3.5, 1.4, 0.2]]),
    "a string": split(IRIS_COLUMNS, [["5.1", 3.5, 1.4, 0.2]]),
    "a null": split(IRIS_COLUMNS, [[None, 3.5, 1.4, 0.2]]),
    "NaN": b'{"dataframe_split": {"columns": %s, "data": [[NaN, 3.5, 1.4, 0.2]]}}' % json.dumps(IRIS_COLUMNS).encode(),
    "an integer beyond int64": split(IRIS_COLUMNS, [[2**64, 3.5, 1.4, 0.2]]),
    "a missing column": split(IRIS_COLUMNS[:3], [[5.1, 3.5, 1.4]]),
    "an extra column": split([*IRIS_COLUMNS, "x"], [[5.1, 3.5, 1.4, 0.2, 1.0]]),
    "a duplicate column": split([*IRIS_COLUMNS[:3], IRIS_COLUMNS[0]], [[5.1, 3.5, 1.4, 0.2]]),
    "a short row": split(IRIS_COLUMNS, [[5.1, 3.5, 1.4]]),
    "no rows": split(IRIS_COLUMNS, []),
    "params": {**split(IRIS_COLUMNS, [[5.1, 3.5, 1.4, 0.2]]), "params": {"x": 1}},
    "inputs": {"inputs": [[5.1, 3.5, 1.4, 0.2]]},
    "instances": {"instances": [dict(zip(IRIS_COLUMNS, [5.1, 3.5, 1.4, 0.2], strict=True))]},
    "a record missing a key": {"dataframe_records": [dict(zip(IRIS_COLUMNS[:3], [5.1, 3.5, 1.4], strict=True))]},
    "not JSON": b"{not json",
}
#: Bodies on which MLflow's own server fails with a bare 500 (Python's int-digits limit, a
#: RecursionError); the model server declines them too, and answers 400 saying why.
MLFLOW_CRASHES = {
    "a huge integer literal": b'{"dataframe_split": {"columns": [], "data": [[' + b"9" * 5000 + b"]]}}",
    "nested too deep": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("case", sorted(TAKEN))
def test_answers_equal_mlflow_and_are_taken(
    both: Callable[..., Any], case: str, models: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    fast, plain = both(models["iris"], TAKEN[case])
    assert fast == plain
    assert fast[0] == 200, fast
    assert (spy.answered, spy.declined) == (1, 0)


@pytest.mark.parametrize("case", sorted(DECLINED))
def test_declined_requests_get_mlflows_answer(
    both: Callable[..., Any], case: str, models: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    fast, plain = both(models["iris"], DECLINED[case])
    assert fast == plain
    assert spy.answered == 0


@pytest.mark.parametrize("case", sorted(MLFLOW_CRASHES))
def test_bodies_mlflow_crashes_on_get_a_clear_400(
    both: Callable[..., Any], case: str, models: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    fast, plain = both(models["iris"], MLFLOW_CRASHES[case])
    assert plain[0] == 500 and plain[2] == b"Internal Server Error", plain  # MLflow's own answer
    assert fast[0] == 400 and json.loads(fast[2])["error_code"] == "BAD_REQUEST", fast
    assert spy.answered == 0


def test_content_types(both: Callable[..., Any], models: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    body = split(IRIS_COLUMNS, [[5.1, 3.5, 1.4, 0.2]])
    for content_type in ("application/json; charset=UTF-8", "application/json;charset=utf-8"):
        fast, plain = both(models["iris"], body, content_type)
        assert fast == plain and fast[0] == 200
    assert spy.answered == 2
    for content_type in ("text/csv", "application/json; charset=latin-1", "application/json; format=pandas-split"):
        fast, plain = both(models["iris"], body, content_type)
        assert fast == plain and fast[0] >= 400, (content_type, fast)
    # Without a content type MLflow's server fails with a bare 500; the model server says 415, and why.
    fast, plain = both(models["iris"], body, None)
    assert fast[0] == 415 and b"Content-Type" in fast[2], fast
    assert plain[0] == 500 and plain[2] == b"Internal Server Error", plain
    assert spy.answered == 2


def test_large_bodies_go_to_mlflow(
    both: Callable[..., Any], models: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    rows = iris_rows(fast_path.MAX_BODY // 20, 5)
    fast, plain = both(models["iris"], split(IRIS_COLUMNS, rows))
    assert fast == plain and fast[0] == 200
    assert spy.answered == 0


@pytest.mark.parametrize(
    ("name", "columns", "rows"),
    [
        ("pipeline_proba", IRIS_COLUMNS, iris_rows(5, 6)),
        ("long_columns", ["a", "b"], [[51, 14], [70, 47], [0, -3], [2**62, 1]]),
        ("mixed_columns", ["length", "petals"], [[5.1, 14], [7, 47], [6.3, 60]]),
        ("no_feature_names", IRIS_COLUMNS, iris_rows(4, 7)),
        (
            "regressor",
            ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"],
            [[0.03, -0.04, 0.06, 0.02, -0.04, -0.03, -0.04, -0.002, 0.02, -0.017], [0] * 10],
        ),
    ],
)
def test_other_models(
    both: Callable[..., Any],
    name: str,
    columns: list[str],
    rows: list[list[Any]],
    models: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = Spy(monkeypatch)
    fast, plain = both(models[name], split(columns, rows))
    assert fast == plain and fast[0] == 200, (fast, plain)
    assert spy.answered == 1


def test_long_columns_decline_floats(
    both: Callable[..., Any], models: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    fast, plain = both(models["long_columns"], split(["a", "b"], [[51.5, 14]]))
    assert fast == plain
    assert spy.answered == 0


def test_models_without_a_fast_path(both: Callable[..., Any], models: dict[str, Any], tmp_path: Path) -> None:
    assert fast_path.FastPath.for_model(models["tensor"]) is None
    assert fast_path.FastPath.for_model(models["iris"]) is not None
    fast, plain = both(models["tensor"], {"inputs": [[5.1, 3.5, 1.4, 0.2]]})
    assert fast == plain and fast[0] == 200


@pytest.fixture(scope="module")
def by_name_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A pipeline whose ColumnTransformer picks columns by name: it needs a DataFrame."""
    from sklearn.compose import ColumnTransformer
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = load_iris(return_X_y=True, as_frame=True)
    pick = ColumnTransformer([("petals", StandardScaler(), ["petal length (cm)", "petal width (cm)"])])
    pipeline = make_pipeline(pick, LogisticRegression(max_iter=500)).fit(X, y)
    return save(tmp_path_factory.mktemp("by-name"), "by-name", pipeline, X.head(2))


def test_an_estimator_that_needs_a_dataframe_turns_the_fast_path_off(
    by_name_model: Any, mlflow_reference: Callable[[Any, bytes, str | None], Answer], monkeypatch: pytest.MonkeyPatch
) -> None:
    example = split(IRIS_COLUMNS, [[5.1, 3.5, 1.4, 0.2]])
    # Checked on the input example before serving: the server never takes the fast path.
    path = fast_path.FastPath.for_model(by_name_model)
    assert path is not None
    reason = path.disagreement(by_name_model, json.dumps(example))
    assert reason and "raised on an array" in reason
    fast = mlflow_server._build_app(by_name_model, {}, fast_path=True, example=json.dumps(example))
    spy = Spy(monkeypatch)  # counts requests, not the check on the example
    body = json.dumps(split(IRIS_COLUMNS, iris_rows(3, 8))).encode()
    answers = [asyncio.run(_post(fast, body, "application/json")),
               mlflow_reference(by_name_model, body, "application/json")]  # fmt: skip
    assert answers[0] == answers[1] and answers[0][0] == 200
    assert spy.answered == spy.declined == 0
    # Without an example to check, each request on which the estimator raises goes to MLflow's app.
    fast = mlflow_server._build_app(by_name_model, {}, fast_path=True)
    for _ in range(3):
        assert asyncio.run(_post(fast, body, "application/json")) == answers[1]
    assert (spy.answered, spy.declined) == (0, 3)


def test_a_disagreement_on_the_example_keeps_the_fast_path_off(models: dict[str, Any]) -> None:
    example = json.dumps(split(IRIS_COLUMNS, [[5.1, 3.5, 1.4, 0.2]]))
    path = fast_path.FastPath.for_model(models["iris"])
    assert path is not None and path.disagreement(models["iris"], example) is None
    path._predict = lambda rows: [2] * len(rows)  # an estimator that reads arrays differently
    assert "differently" in (path.disagreement(models["iris"], example) or "")


def test_one_client_cannot_turn_the_fast_path_off_for_everyone(models: dict[str, Any]) -> None:
    """An estimator that raises on one request's rows: that request goes to MLflow's app; the next
    request of plain rows is still answered by the fast path."""
    path = fast_path.FastPath.for_model(models["iris"])
    assert path is not None
    predict = path._predict

    def picky(rows: Any) -> Any:
        if rows[0][0] == 99.0:
            raise ValueError("sepal length out of range")
        return predict(rows)

    path._predict = picky
    bad = json.dumps(split(IRIS_COLUMNS, [[99.0, 3.5, 1.4, 0.2]])).encode()
    good = json.dumps(split(IRIS_COLUMNS, [[5.1, 3.5, 1.4, 0.2]])).encode()
    assert path.answer(bad, b"application/json") is None
    assert path.off_reason is None
    assert json.loads(path.answer(good, b"application/json") or b"null") == {"predictions": [0]}
