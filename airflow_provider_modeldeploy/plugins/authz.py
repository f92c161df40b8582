"""Who may see and change which served models, asked of Airflow's auth manager as Airflow asks it.

Airflow mounts plugin apps without authentication, so every route depends on ``current_user``
(Airflow's own ``get_user``: Bearer token, else the UI's ``_token`` session cookie), then:

* **reading** a service (list, detail, logs, health, its deploy task's XCom) needs the custom view
  "Served Models" with GET *and* read permission on the DAG that deployed it, team included, as
  Airflow's own DAG routes check it. A service deployed outside a DAG is visible to those who may
  read all DAGs. The list is filtered the same way (``get_authorized_dag_ids``).
* **acting** (start, stop, rollback: POST; delete: DELETE) needs that custom view with the action's
  method *and* edit (PUT) permission on the service's DAG (on all DAGs for a service without one).
  A rollback is also authorized against the DAG of the version it brings back.
* **cookie-authenticated writes** come from the page itself: the browser's ``Origin`` must be this
  server's, or the request carries the header the page sends (``X-Served-Models: 1``), which no other
  site can set on a cross-origin request without a CORS grant. Bearer-token writes are not
  cross-site-forgeable and need neither.

SimpleAuthManager grants custom views to every role, so the DAG checks are what keep its ``viewer``
role read-only, as it is on DAGs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

RESOURCE_NAME = "Served Models"
#: The header the page sends with every write (see the module docstring).
PAGE_HEADER = "X-Served-Models"

_bearer = HTTPBearer(auto_error=False)


async def current_user(
    request: Request, bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> BaseUser:
    """The Airflow user of this request, resolved by Airflow's own ``get_user`` (401 when none)."""
    from airflow.api_fastapi.core_api.security import get_user

    user = await get_user(request, None, bearer)
    request.state.served_models_bearer = bearer is not None
    return user


User = Annotated[BaseUser, Depends(current_user)]


def _auth_manager() -> Any:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager()


def _dag_details(dag_id: str | None) -> Any:
    """Airflow's DagDetails with the DAG's team (multi-team deployments); None means all DAGs."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

    if not dag_id:
        return None
    from airflow.models.dag import DagModel

    return DagDetails(id=dag_id, team_name=DagModel.get_team_name(dag_id))


def may_view(user: BaseUser, method: str = "GET") -> bool:
    return bool(_auth_manager().is_authorized_custom_view(method=method, resource_name=RESOURCE_NAME, user=user))


def may_read_dag(user: BaseUser, dag_id: str | None, access_entity: Any = None) -> bool:
    return bool(
        _auth_manager().is_authorized_dag(
            method="GET", access_entity=access_entity, details=_dag_details(dag_id), user=user
        )
    )


def may_act(user: BaseUser, method: str, *dag_ids: str | None) -> bool:
    """The custom view with ``method``, and edit permission on every DAG named (all DAGs for None)."""
    manager = _auth_manager()
    if not may_view(user, method) or not may_view(user):
        return False
    return all(
        manager.is_authorized_dag(method="PUT", details=_dag_details(dag_id), user=user) for dag_id in dag_ids or [None]
    )


@dataclass(frozen=True)
class Visibility:
    """Which services a user may read: those of ``dag_ids``, and those deployed outside a DAG if
    ``no_dag``."""

    dag_ids: frozenset[str]
    no_dag: bool


def visibility(user: BaseUser, registry_dag_ids: set[str]) -> Visibility:
    """What ``user`` may read among services of ``registry_dag_ids``: Airflow's authorized DAG ids
    (teams included), plus DAGs Airflow no longer knows, judged one by one as a detail page would.

    Never "all DAGs" from one check: with teams, a role that reads DAGs reads only its teams' DAGs."""
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    manager = _auth_manager()
    allowed = set(manager.get_authorized_dag_ids(user=user, method="GET"))
    with create_session() as session:
        known = set(session.scalars(select(DagModel.dag_id).where(DagModel.dag_id.in_(sorted(registry_dag_ids)))))
    # A DAG Airflow does not know has no team: no team lookup (one query each) for them.
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

    allowed |= {
        dag_id
        for dag_id in registry_dag_ids - known
        if manager.is_authorized_dag(method="GET", details=DagDetails(id=dag_id), user=user)
    }
    return Visibility(dag_ids=frozenset(allowed & registry_dag_ids), no_dag=may_read_dag(user, None))


def reader(user: User) -> BaseUser:
    if not may_view(user):
        raise HTTPException(status_code=403, detail=f"{user.get_name()} may not view {RESOURCE_NAME}")
    return user


Reader = Annotated[BaseUser, Depends(reader)]


def require_read(user: BaseUser, record: Any) -> None:
    """403 unless the user may read the service's DAG; says nothing of the service (nor its DAG's id)."""
    if not may_read_dag(user, record.dag_id):
        what = "the DAG that deployed it" if record.dag_id else "all DAGs"
        raise HTTPException(
            status_code=403,
            detail=f"{user.get_name()} may not read served model {record.uuid} (needs read permission on {what})",
        )


def require_act(user: BaseUser, method: str, record: Any, *other_dag_ids: str | None) -> None:
    require_read(user, record)
    if not may_act(user, method, record.dag_id, *other_dag_ids):
        dags = ", ".join(sorted({d or "* (all DAGs)" for d in (record.dag_id, *other_dag_ids)}))
        raise HTTPException(
            status_code=403,
            detail=f"{user.get_name()} may not change served model {record.uuid} "
            f"(needs edit permission on {RESOURCE_NAME} and on DAG {dags})",
        )


def _origin_of(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}".lower()


def _configured_origin() -> str | None:
    """``[api] base_url``'s origin: the browser's view when a proxy rewrites Host."""
    from urllib.parse import urlsplit

    from airflow.configuration import conf

    base = conf.get("api", "base_url", fallback="") or ""
    parts = urlsplit(base)
    return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme and parts.netloc else None


def same_origin_write(request: Request, user: User) -> BaseUser:
    """A write authenticated by the session cookie must come from this site (module docstring)."""
    if getattr(request.state, "served_models_bearer", False):
        return user
    origin = (request.headers.get("origin") or "").rstrip("/").lower()
    if origin and origin != "null":
        if origin in {_origin_of(request), _configured_origin()}:
            return user
        raise HTTPException(status_code=403, detail=f"cross-site request refused (Origin {origin})")
    if request.headers.get(PAGE_HEADER) == "1":
        return user
    raise HTTPException(
        status_code=403,
        detail=f"cookie-authenticated writes need a same-origin Origin or the {PAGE_HEADER} header",
    )


Writer = Annotated[BaseUser, Depends(same_origin_write)]
