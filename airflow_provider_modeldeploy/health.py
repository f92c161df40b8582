"""Health checks of a served model over its public URLs, the same for every backend."""

from __future__ import annotations

import json
from typing import Any

_TIMEOUT = 10.0


def _body(sample_input: Any) -> str:
    return sample_input if isinstance(sample_input, str) else json.dumps(sample_input)


def _verdict(health: Any, prediction: Any | None) -> tuple[bool, str]:
    if health.status_code != 200:
        return False, f"health answered HTTP {health.status_code}"
    if prediction is not None and prediction.status_code != 200:
        return False, f"sample prediction answered HTTP {prediction.status_code}: {prediction.text[:200]}"
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

    try:
        with httpx.Client(timeout=_TIMEOUT) as client:
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

    try:
        async with httpx.AsyncClient(timeout=_TIMEOUT) as client:
            health = await client.get(health_url)
            prediction = None
            if health.status_code == 200 and sample_input is not None and prediction_url:
                prediction = await client.post(
                    prediction_url, content=_body(sample_input), headers={"content-type": "application/json"}
                )
    except httpx.HTTPError as exc:
        return False, f"{health_url}: {type(exc).__name__}: {exc}"
    return _verdict(health, prediction)
