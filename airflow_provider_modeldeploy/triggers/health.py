"""Wait in the triggerer until a served model answers health (and a sample prediction)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from enum import StrEnum
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class HealthOutcome(StrEnum):
    """The ``status`` of the trigger's one event."""

    HEALTHY = "success"  # health answered 200, and the sample prediction too
    FAILED = "failed"  # the server refuses the sample prediction (4xx): waiting will not change it
    TIMED_OUT = "timeout"  # not healthy within the timeout; ``message`` says what was seen last


class ServedModelHealthTrigger(BaseTrigger):
    """Polls the service's public URLs; fires one event whose ``status`` is a :class:`HealthOutcome`.

    :param service_uuid: the service waited on (for messages).
    :param health_url: URL answering 200 when the server is up.
    :param prediction_url: where ``sample_input`` is POSTed, when given.
    :param sample_input: JSON body (str or JSON-able) for a sample prediction.
    :param poll_interval: seconds between checks.
    :param timeout: seconds until the trigger gives up; None waits forever.
    """

    def __init__(
        self,
        service_uuid: str,
        health_url: str,
        prediction_url: str | None = None,
        sample_input: Any = None,
        poll_interval: float = 5.0,
        timeout: float | None = None,
    ) -> None:
        super().__init__()
        self.service_uuid = service_uuid
        self.health_url = health_url
        self.prediction_url = prediction_url
        self.sample_input = sample_input
        self.poll_interval = poll_interval
        self.timeout = timeout

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "service_uuid": self.service_uuid,
                "health_url": self.health_url,
                "prediction_url": self.prediction_url,
                "sample_input": self.sample_input,
                "poll_interval": self.poll_interval,
                "timeout": self.timeout,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow_provider_modeldeploy.health import acheck_health, is_final

        started = time.monotonic()
        while True:
            ok, reason = await acheck_health(self.health_url, self.prediction_url, self.sample_input)
            if ok:
                yield self._event(HealthOutcome.HEALTHY, reason)
                return
            if is_final(reason):
                yield self._event(HealthOutcome.FAILED, reason)
                return
            if self.timeout is not None and time.monotonic() - started > self.timeout:
                yield self._event(HealthOutcome.TIMED_OUT, f"not healthy after {self.timeout}s: {reason}")
                return
            self.log.info("Service %s not healthy yet: %s", self.service_uuid, reason)
            await asyncio.sleep(self.poll_interval)

    def _event(self, outcome: HealthOutcome, message: str) -> TriggerEvent:
        return TriggerEvent({"status": str(outcome), "service_uuid": self.service_uuid, "message": message})
