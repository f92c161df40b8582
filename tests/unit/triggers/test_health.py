"""triggers/health.py: serialize() round trip and the one event of each outcome (health checks mocked)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from airflow_provider_modeldeploy import health
from airflow_provider_modeldeploy.triggers.health import HealthOutcome, ServedModelHealthTrigger


def trigger(**kwargs: Any) -> ServedModelHealthTrigger:
    base = dict(service_uuid="s-1", health_url="http://h/health", prediction_url="http://h/invocations",
                sample_input={"inputs": [[1, 2]]}, poll_interval=0.01, timeout=None)  # fmt: skip
    return ServedModelHealthTrigger(**{**base, **kwargs})


def test_serialize_round_trips() -> None:
    original = trigger(timeout=30.0)
    path, kwargs = original.serialize()
    assert path == "airflow_provider_modeldeploy.triggers.health.ServedModelHealthTrigger"
    assert kwargs == {"service_uuid": "s-1", "health_url": "http://h/health", "prediction_url": "http://h/invocations",
                      "sample_input": {"inputs": [[1, 2]]}, "poll_interval": 0.01, "timeout": 30.0}  # fmt: skip
    from airflow.sdk._shared.module_loading import import_string

    again = import_string(path)(**kwargs)
    assert again.serialize() == (path, kwargs)


def events(trig: ServedModelHealthTrigger) -> list[dict[str, Any]]:
    async def collect() -> list[dict[str, Any]]:
        return [event.payload async for event in trig.run()]

    return asyncio.run(asyncio.wait_for(collect(), 10))


def answers(monkeypatch: pytest.MonkeyPatch, *verdicts: tuple[bool, str]) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = []

    async def acheck_health(*args: Any) -> tuple[bool, str]:
        calls.append(args)
        return verdicts[min(len(calls), len(verdicts)) - 1]

    monkeypatch.setattr(health, "acheck_health", acheck_health)
    return calls


def test_fires_success_once_healthy(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = answers(monkeypatch, (False, "health answered HTTP 503"), (True, "healthy; sample prediction: [0]"))
    assert events(trigger()) == [
        {"status": "success", "service_uuid": "s-1", "message": "healthy; sample prediction: [0]"}
    ]
    assert len(calls) == 2 and calls[0] == ("http://h/health", "http://h/invocations", {"inputs": [[1, 2]]})


def test_fires_failed_at_once_when_the_sample_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = answers(monkeypatch, (False, "sample prediction answered HTTP 400: bad columns"))
    [event] = events(trigger(timeout=None))  # would wait forever otherwise
    assert event["status"] == HealthOutcome.FAILED == "failed" and "bad columns" in event["message"] and len(calls) == 1


def test_fires_timeout_saying_what_was_seen_last(monkeypatch: pytest.MonkeyPatch) -> None:
    answers(monkeypatch, (False, "health answered HTTP 503"))
    [event] = events(trigger(timeout=0.05))
    assert event["status"] == "timeout"
    assert event["message"] == "not healthy after 0.05s: health answered HTTP 503"


def test_busy_answers_are_waited_on(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = answers(monkeypatch, (False, "sample prediction answered HTTP 429: slow down"), (True, "healthy"))
    assert events(trigger())[0]["status"] == "success" and len(calls) == 2
