"""Watch MLflow Model Registry aliases from the triggerer; fire an asset event when one moves.

Used in an ``AssetWatcher`` (event-driven scheduling): a DAG scheduled on the asset deploys the
version the event names. See ``dags/deploy_on_alias_move.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, TypedDict

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

from airflow_provider_modeldeploy.exceptions import InvalidParameterError
from airflow_provider_modeldeploy.mlflow_aliases import AliasReadError, AliasURI


class AliasMoved(TypedDict):
    """The payload of the trigger's events (``event.extra["payload"]`` of the asset event)."""

    event: str  # always "alias_moved"
    model_uri: str  # models:/<name>@<alias>, as watched
    model_name: str
    alias: str
    endpoint: str  # the endpoint to deploy to (its served version is what the alias is compared with)
    version: str  # the version the alias names now
    previous_version: str | None  # what it named before, as last seen (else the endpoint's served version)
    served_version: str | None  # what the endpoint served when the move was seen
    run_id: str | None  # the MLflow run of the new version
    moved_by: str | None  # who moved the alias, when MLflow records it (open-source MLflow does not)
    version_created_by: str | None  # who registered the version, when MLflow recorded it
    observed_at: str  # ISO time the watcher saw the move
    conn_id: str | None
    tracking_uri: str  # without credentials


class MlflowAliasTrigger(BaseEventTrigger):
    """Polls ``models:/<name>@<alias>`` URIs; yields one :class:`AliasMoved` event per move.

    A move is a change of the version the alias names, to a version the endpoint does not serve
    (an alias moved to the served version, e.g. by a DAG that deployed first, needs no deployment).
    Moving an alias back to an earlier version (a rollback in MLflow) is a move. A version served
    by other means (``airflow served-models rollback``) while the alias stays put is not undone.

    What the alias named at the last poll is kept in memory and in Airflow's asset state store
    (Airflow >= 3.3), so a restarted triggerer does not fire a move twice, even while its
    deployment runs. Without that state (the first poll ever, or no state store), the alias is
    compared with the version the endpoint serves, from the served-models registry: a move made
    while no triggerer watched is deployed, and one already deployed is not fired again.

    :param model_uris: one or more ``models:/<name>@<alias>``.
    :param conn_id: the deployer connection (``modeldeploy_mlflow``, ...): the tracking URI and basic
        auth are read from it inside the triggerer (never serialized); None for the default one.
    :param endpoint: the endpoint whose served version the alias is compared with, for one URI
        (default: the model name, as ``DeployModelOperator``).
    :param poll_interval: seconds between polls.
    :param max_backoff: after failures the interval doubles, up to this many seconds.
    :param request_timeout: seconds one registry request may take.
    """

    def __init__(
        self,
        model_uris: str | list[str],
        conn_id: str | None = None,
        endpoint: str | None = None,
        poll_interval: float = 30.0,
        max_backoff: float = 300.0,
        request_timeout: float = 30.0,
    ) -> None:
        super().__init__()
        uris = [model_uris] if isinstance(model_uris, str) else list(model_uris)
        if not uris:
            raise InvalidParameterError("model_uris", model_uris, "name at least one models:/<name>@<alias>")
        if endpoint is not None and len(uris) != 1:
            raise InvalidParameterError(
                "endpoint", endpoint, "is for a watcher of one alias; use one trigger per alias"
            )
        for name, value in (("poll_interval", poll_interval), ("max_backoff", max_backoff), ("request_timeout", request_timeout)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise InvalidParameterError(name, value, "must be a positive number of seconds")
        self.targets = [AliasURI.parse(uri, endpoint) for uri in uris]
        self.model_uris = uris
        self.conn_id = conn_id
        self.endpoint = endpoint
        self.poll_interval = float(poll_interval)
        self.max_backoff = max(float(max_backoff), self.poll_interval)
        self.request_timeout = float(request_timeout)
        self._seen: dict[str, str | None] = {}  # uri -> the version the alias named at the last poll
        self._stored: dict[str, str | None] = {}  # uri -> what the asset state store holds of _seen

    def serialize(self) -> tuple[str, dict[str, Any]]:
        # No credentials: the connection is named, and read in the triggerer. The kwargs are also what
        # Airflow hashes to tell watchers apart, so they hold only what defines the watch.
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "model_uris": self.model_uris,
                "conn_id": self.conn_id,
                "endpoint": self.endpoint,
                "poll_interval": self.poll_interval,
                "max_backoff": self.max_backoff,
                "request_timeout": self.request_timeout,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        watched = ", ".join(self.model_uris)
        failures = 0
        source: tuple[Any, str] | None = None  # (settings, backend), read once the connection is found
        await self._load_seen()
        while True:
            failed = False
            try:
                if source is None:
                    source = await self._source()
            except Exception as exc:
                failed = True
                failures += 1
                self.log.warning(
                    "Alias watcher (%s): cannot use connection %r: %s; retrying in %gs (failure %d)",
                    watched, self.conn_id, _one_line(exc), self._delay(failures), failures,
                )  # fmt: skip
            for target in self.targets if source is not None else []:
                settings, backend = source
                try:
                    move = await asyncio.to_thread(self._check, target, settings, backend)
                except Exception as exc:
                    failed = True
                    failures += 1
                    self.log.warning(
                        "Alias watcher: cannot read %s from %s: %s; retrying in %gs (failure %d)",
                        target.uri, _shown(settings.registry_uri or settings.tracking_uri), _one_line(exc),
                        self._delay(failures), failures,
                    )  # fmt: skip
                    continue
                if move is not None:
                    self.log.info(
                        "Alias %s moved %s -> %s (endpoint %s serves %s)", target.uri,
                        move["previous_version"] or "-", move["version"], target.endpoint, move["served_version"] or "nothing",
                    )  # fmt: skip
                    yield TriggerEvent(dict(move))
                # Kept after the event is handed over: a crash in between fires the move again at
                # restart (the deploy DAG skips a version already served), never loses it.
                await self._store_seen(target.uri)
            if not failed and failures:
                self.log.info("Alias watcher (%s): the tracking server answers again", watched)
                failures = 0
            await asyncio.sleep(self._delay(failures) if failed else self.poll_interval)

    def _delay(self, failures: int) -> float:
        return min(self.poll_interval * 2 ** min(failures, 16), self.max_backoff)

    async def _source(self) -> tuple[Any, str]:
        """The connection's MLflow settings and the backend whose registry rows say what is served."""
        from airflow_provider_modeldeploy import config

        conn_id = self.conn_id or config.default_conn_id()
        connection = await _aconnection(conn_id)
        # Imports and settings parsing in a thread: the triggerer's event loop runs every trigger.
        return await asyncio.to_thread(self._settings, conn_id, connection)

    def _settings(self, conn_id: str, connection: Any | None) -> tuple[Any, str]:
        from airflow_provider_modeldeploy import config
        from airflow_provider_modeldeploy.deployers import DEPLOYERS, _load
        from airflow_provider_modeldeploy.hooks.mlflow_local import MlflowDeployerHook

        if connection is None:
            if self.conn_id is not None and self.conn_id != config.default_conn_id():
                raise InvalidParameterError("conn_id", self.conn_id, "no Airflow connection has this id")
            return MlflowDeployerHook(None).get_settings(), "mlflow"  # the zero-configuration defaults
        if connection.conn_type not in DEPLOYERS:
            raise InvalidParameterError(
                "conn_id", conn_id, f"is a '{connection.conn_type}' connection, not a model deployer connection"
            )
        backend = _load(DEPLOYERS[connection.conn_type]).backend
        return MlflowDeployerHook(conn_id, connection=connection).get_settings(), backend

    def _check(self, target: AliasURI, settings: Any, backend: str) -> AliasMoved | None:
        """One poll of one alias (blocking: run in a thread). The move to fire, or None."""
        from airflow_provider_modeldeploy.hooks.mlflow_local import strip_credentials
        from airflow_provider_modeldeploy.mlflow_aliases import read_alias

        named = read_alias(settings, target, self.request_timeout)
        served = _served_version(backend, target.endpoint)
        version = named.version if named else None
        # The first look (no state kept): what the endpoint serves is what the alias named last.
        before = self._seen.get(target.uri, served)
        self._seen[target.uri] = version
        if named is None or version == before:
            return None  # no alias (yet), or it did not move
        if version == served:
            return None  # moved to the version already served: nothing to deploy
        return AliasMoved(
            event="alias_moved", model_uri=target.uri, model_name=target.name, alias=target.alias,
            endpoint=target.endpoint, version=named.version,
            previous_version=before, served_version=served,
            run_id=named.run_id, moved_by=None, version_created_by=named.created_by,
            observed_at=datetime.now(UTC).isoformat(), conn_id=self.conn_id,
            tracking_uri=_shown(strip_credentials(settings.registry_uri or settings.tracking_uri)),
        )  # fmt: skip

    # Best effort: without a state store (Airflow < 3.3, a trigger shared by several assets) the
    # registry comparison above still keeps a restart from firing a move that was deployed.
    async def _load_seen(self) -> None:
        store = getattr(self, "asset_state_store", None)
        if store is None:
            return
        for target in self.targets:
            try:
                version = await store.aget(_state_key(target.uri))
            except Exception as exc:
                self.log.debug("No asset state for %s: %s", target.uri, exc)
                return
            if isinstance(version, str):
                self._seen[target.uri] = self._stored[target.uri] = version

    async def _store_seen(self, uri: str) -> None:
        store = getattr(self, "asset_state_store", None)
        version = self._seen.get(uri)
        if store is None or uri not in self._seen or self._stored.get(uri, "") == version:
            return
        try:
            if version is None:
                await store.adelete(_state_key(uri))
            else:
                await store.aset(_state_key(uri), version)
            self._stored[uri] = version
        except Exception as exc:
            self.log.debug("Could not keep the alias version of %s in the asset state: %s", uri, exc)


def _state_key(uri: str) -> str:
    return f"modeldeploy.alias_version:{uri}"


def _served_version(backend: str, endpoint: str) -> str | None:
    """The version the endpoint's active service serves, as the registry records it (no probe)."""
    from airflow_provider_modeldeploy.registry import get_registry
    from airflow_provider_modeldeploy.services import ServiceState

    active = get_registry().find_services(backend=backend, endpoint=endpoint, states=[ServiceState.ACTIVE])
    return active[0].model_version if active else None


async def _aconnection(conn_id: str) -> Any | None:
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return await BaseHook.aget_connection(conn_id)
    except AirflowNotFoundException:
        return None


def _one_line(exc: BaseException) -> str:
    from airflow_provider_modeldeploy.masking import mask_text

    if isinstance(exc, AliasReadError | InvalidParameterError):
        return mask_text(str(exc))
    return mask_text(f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")


def _shown(uri: str | None) -> str:
    from airflow_provider_modeldeploy.masking import mask_text

    return mask_text(uri or "")
