"""Errors users see. Each names the field and the value at fault, in one line, without a traceback."""

from __future__ import annotations

from typing import Any


class ModelDeployError(Exception):
    """Base of every error this provider raises on purpose."""


class InvalidParameterError(ModelDeployError, ValueError):
    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}={value!r}: {reason}")


class ServiceNotFoundError(ModelDeployError, LookupError):
    def __init__(self, field: str, value: Any, reason: str = "no served model matches") -> None:
        self.field = field
        self.value = value
        super().__init__(f"{field}={value!r}: {reason}")


class RegistryUnavailableError(ModelDeployError):
    """The served-models registry database cannot be reached or used."""


class EndpointBusyError(ModelDeployError):
    """Another deployment holds the endpoint for longer than we may wait."""


class DeploymentFailedError(ModelDeployError):
    """A model server did not come up; the previous server (if any) keeps serving."""


class AgentUnreachableError(ModelDeployError):
    """The serving agent that runs a service cannot be reached, or refused us: nothing was changed."""

    def __init__(self, host: str | None, address: str, reason: str) -> None:
        self.host = host
        self.address = address
        super().__init__(
            f"agent_url={address!r}: the serving agent of host {host or 'unknown'!r} cannot be reached ({reason}); "
            "nothing was changed"
        )
