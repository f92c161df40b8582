"""Health checks of a served model over its public URLs, the same for every backend."""

from __future__ import annotations

import json
from typing import Any

_TIMEOUT = 10.0


def _body(sample_input: Any) -> str:
    return sample_input if isinstance(sample_input, str) else json.dumps(sample_input)


def answer_message(text: str, limit: int = 300) -> str:
    """What an error answer of a model server says, by the shapes the servers answer in: Seldon's
    python wrapper and executor (``{"status": {"info": ..., "reason": ...}}``), MLServer and KServe
    (``{"error": ...}``), FastAPI's validation errors (``{"detail": [{"loc": [...], "msg": ...}]}``
    or ``{"detail": "..."}``), MLflow's scoring server (``{"message": ...}``); else the text itself."""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:limit]
    message: Any = None
    if isinstance(body, dict):
        status = body.get("status")
        if isinstance(status, dict) and status.get("info") is not None:
            message = str(status["info"])
            if status.get("reason"):
                message += f" ({status['reason']})"
        elif isinstance(body.get("error"), str):
            message = body["error"]
        elif isinstance(body.get("detail"), list):
            message = "; ".join(
                ".".join(str(p) for p in (d.get("loc") or [])) + f": {d.get('msg')}" if isinstance(d, dict) else str(d)
                for d in body["detail"]
            )
        elif isinstance(body.get("detail"), str):
            message = body["detail"]
        elif isinstance(body.get("message"), str):
            message = body["message"]
    return (message if message is not None else text.strip())[:limit]


def prediction_problem(text: str) -> str | None:
    """Why a 200 answer is no prediction (None when it is one): a Seldon protocol answer carries
    ``data`` (``ndarray``, ``tensor``, ``tftensor``) or ``jsonData``/``strData``/``binData``, an
    open-inference (V2) answer ``outputs``, MLflow's ``predictions``, KServe v1 ``predictions``. A
    Seldon message with a FAILURE status is an error even if some proxy answered 200."""
    try:
        body = json.loads(text)
    except ValueError:
        return "the answer is not JSON"
    if isinstance(body, list):
        return None  # MLflow's bare list of predictions
    if not isinstance(body, dict):
        return f"the answer is a JSON {type(body).__name__}"
    status = body.get("status")
    if isinstance(status, dict) and status.get("status") in ("FAILURE", 1):
        return f"the answer is an error: {answer_message(text)}"
    if isinstance(body.get("data"), dict) and any(k in body["data"] for k in ("ndarray", "tensor", "tftensor")):
        return None
    if any(k in body for k in ("jsonData", "strData", "binData", "predictions")):
        return None
    outputs = body.get("outputs")
    if isinstance(outputs, list) and all(isinstance(o, dict) and "data" in o for o in outputs) and outputs:
        return None
    return f"the answer has no prediction: {text.strip()[:200]}"


def _verdict(health: Any, prediction: Any | None) -> tuple[bool, str]:
    if health.status_code != 200:
        return False, f"health answered HTTP {health.status_code}"
    if prediction is not None and prediction.status_code != 200:
        return (
            False,
            f"sample prediction answered HTTP {prediction.status_code}: {answer_message(prediction.text, 200)}",
        )
    if prediction is not None:
        problem = prediction_problem(prediction.text)
        if problem:
            return False, f"sample prediction answered HTTP 200 but {problem}"
    return True, "healthy" + (f"; sample prediction: {prediction.text[:200]}" if prediction is not None else "")


#: Answers to the sample prediction that waiting will not change: the server is up and refuses the
#: sample itself (wrong columns, types, content). 408 and 429 are the server being busy, not refusing.
_REFUSED = frozenset(range(400, 500)) - {404, 408, 425, 429}


def is_final(reason: str) -> bool:
    """Whether an unhealthy verdict is final (the sample itself is refused), not worth waiting on."""
    prefix = "sample prediction answered HTTP "
    return (
        reason.startswith(prefix)
        and reason[len(prefix) : len(prefix) + 3].isdigit()
        and (int(reason[len(prefix) : len(prefix) + 3]) in _REFUSED)
    )


def check_health(health_url: str, prediction_url: str | None = None, sample_input: Any = None) -> tuple[bool, str]:
    """(healthy, reason): GET health_url, then POST sample_input to prediction_url when given."""
    import httpx

    from airflow_provider_modeldeploy.hooks.tls import default_tls

    try:
        with httpx.Client(timeout=_TIMEOUT, verify=default_tls()) as client:
            health = client.get(health_url)
            prediction = None
            if health.status_code == 200 and sample_input is not None and prediction_url:
                prediction = client.post(
                    prediction_url, content=_body(sample_input), headers={"content-type": "application/json"}
                )
    except httpx.HTTPError as exc:
        return False, f"{health_url}: {type(exc).__name__}: {exc}"
    return _verdict(health, prediction)


async def acheck_health(
    health_url: str, prediction_url: str | None = None, sample_input: Any = None
) -> tuple[bool, str]:
    """The same check, for triggers (non-blocking)."""
    import httpx

    from airflow_provider_modeldeploy.hooks.tls import default_tls

    try:
        async with httpx.AsyncClient(timeout=_TIMEOUT, verify=default_tls()) as client:
            health = await client.get(health_url)
            prediction = None
            if health.status_code == 200 and sample_input is not None and prediction_url:
                prediction = await client.post(
                    prediction_url, content=_body(sample_input), headers={"content-type": "application/json"}
                )
    except httpx.HTTPError as exc:
        return False, f"{health_url}: {type(exc).__name__}: {exc}"
    return _verdict(health, prediction)
