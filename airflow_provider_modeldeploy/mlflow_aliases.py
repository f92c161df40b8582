"""MLflow Model Registry aliases: parse ``models:/<name>@<alias>``, read the version an alias names,
and say in one line who or what moved it (for the endpoint history).

Read through MLflow's client layer with the deployer connection's tracking URI and basic auth, never
through process-wide environment variables: the triggerer runs many triggers in one process, and
two watchers may use two tracking servers with different credentials.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from airflow_provider_modeldeploy.exceptions import InvalidParameterError, ModelDeployError

if TYPE_CHECKING:
    from airflow_provider_modeldeploy.hooks.mlflow_local import MlflowServingSettings

_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")


class AliasReadError(ModelDeployError):
    """The tracking server could not tell which version an alias names (unreachable, refused, ...)."""


@dataclass(frozen=True)
class AliasURI:
    """One watched ``models:/<name>@<alias>`` and the endpoint whose served version it is compared with."""

    uri: str
    name: str
    alias: str
    endpoint: str

    @classmethod
    def parse(cls, uri: Any, endpoint: str | None = None) -> AliasURI:
        from airflow_provider_modeldeploy.services import validate_name

        match = _ALIAS_URI.match(uri) if isinstance(uri, str) else None
        if match is None:
            raise InvalidParameterError("model_uris", uri, "use models:/<name>@<alias>")
        if endpoint is None:
            try:
                endpoint = validate_name("endpoint", match["name"])
            except InvalidParameterError as exc:
                raise InvalidParameterError(
                    "endpoint", None, f"model name {match['name']!r} is no endpoint name; pass endpoint="
                ) from exc
        return cls(uri=uri, name=match["name"], alias=match["alias"], endpoint=validate_name("endpoint", endpoint))


@dataclass(frozen=True)
class AliasTarget:
    """The model version an alias names, as the Model Registry records it."""

    version: str
    run_id: str | None = None
    #: who created the version, when MLflow recorded it (MLflow records no author of an alias move)
    created_by: str | None = None


def _short(exc: BaseException) -> str:
    """One line for a log: the cause, not the pages MLflow and urllib3 wrap around a refused connection,
    and never the URL's credentials."""
    from airflow_provider_modeldeploy.masking import mask_text

    text = " ".join(str(exc).split()) or type(exc).__name__
    errno = re.search(r"\[Errno -?\d+\] ([^'\"\)\]]+)", text)
    if errno:
        return f"connection failed ({errno[1].strip()})"
    if "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
        return "no answer in time (timed out)"
    return mask_text(f"{type(exc).__name__}: {text[:300]}")


def read_alias(settings: MlflowServingSettings, target: AliasURI, timeout: float = 30) -> AliasTarget | None:
    """The version ``target``'s alias names now; None when the alias (or the model) does not exist.

    Raises AliasReadError, in one line, when the registry cannot answer. Blocking: call it off the
    event loop.
    """
    uri = settings.registry_uri or settings.tracking_uri
    try:
        if urlsplit(uri).scheme in ("http", "https"):
            return _read_over_rest(uri, settings, target, timeout)
        return _read_with_client(settings, target)
    except AliasReadError:
        raise
    except Exception as exc:
        raise AliasReadError(_short(exc)) from None


def _read_over_rest(uri: str, settings: MlflowServingSettings, target: AliasURI, timeout: float) -> AliasTarget | None:
    """MLflow's REST helper with this connection's credentials, one attempt: our caller retries with
    its own backoff (MLflow's default of 7 retries would hide an outage for minutes, and log each)."""
    from mlflow.utils.rest_utils import MlflowHostCreds, http_request

    from airflow_provider_modeldeploy.hooks.mlflow_local import strip_credentials

    parts = urlsplit(uri)
    creds = MlflowHostCreds(
        host=strip_credentials(uri).rstrip("/"),
        username=settings.username or parts.username,
        password=settings.password or parts.password,
    )
    response = http_request(
        creds, "/api/2.0/mlflow/registered-models/alias", "GET", max_retries=0, timeout=timeout,
        params={"name": target.name, "alias": target.alias}, raise_on_status=False,
    )  # fmt: skip
    if response.status_code == 200:
        version = response.json().get("model_version") or {}
        return AliasTarget(str(version["version"]), version.get("run_id") or None, version.get("user_id") or None)
    try:
        body = response.json()
    except ValueError:
        body = {}
    if _is_missing(body.get("error_code"), body.get("message")):
        return None
    if response.status_code in (401, 403):
        raise AliasReadError(f"the tracking server refused the connection's credentials (HTTP {response.status_code})")
    detail = body.get("message") or " ".join(response.text.split())[:200]
    raise AliasReadError(f"the tracking server answered HTTP {response.status_code}: {detail}")


def _read_with_client(settings: MlflowServingSettings, target: AliasURI) -> AliasTarget | None:
    """Stores MLflow reaches without HTTP (a SQLite or file store, Databricks): MLflow's own client."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)
    try:
        version = client.get_model_version_by_alias(target.name, target.alias)
    except MlflowException as exc:
        if _is_missing(exc.error_code, exc.message):
            return None
        raise
    return AliasTarget(str(version.version), version.run_id or None, getattr(version, "user_id", None) or None)


def _is_missing(error_code: Any, message: Any) -> bool:
    """No such model, or no such alias (which MLflow's SQL store reports as an invalid parameter)."""
    if error_code == "RESOURCE_DOES_NOT_EXIST":
        return True
    return error_code == "INVALID_PARAMETER_VALUE" and bool(re.search(r"alias .* not found", str(message or "")))


def describe_move(move: dict[str, Any]) -> str:
    """The endpoint history's words for an alias move: ``alias champion of iris moved 2 -> 1 by alice``."""
    text = f"alias {move.get('alias')} of {move.get('model_name')} moved {move.get('previous_version') or '-'} -> {move.get('version')}"
    return f"{text} by {move['moved_by']}" if move.get("moved_by") else text
