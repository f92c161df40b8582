"""The "Served Models" FastAPI app: two HTML pages (list, detail) and the JSON API they call.

Airflow mounts plugin apps without authentication, so every route here depends on Airflow's own
``get_user`` (Bearer token, else the UI's ``_token`` session cookie) and asks the auth manager:

* reading (pages, list, detail, logs, health) needs the custom view "Served Models" with GET;
* acting (start, stop, rollback: POST; delete: DELETE) needs that custom view with the action's
  method *and* edit (PUT) permission on the DAG that deployed the service (on DAGs in general when
  the service was deployed outside a DAG). SimpleAuthManager grants custom views to every role, so
  the DAG check is what keeps its ``viewer`` role read-only, as it is on DAGs.

Nothing here is backend-specific: rows come from the registry, actions go through the deployer that
manages each service (``deployer_for_service``), whatever its backend.
"""

from __future__ import annotations

import logging
import re
from importlib.resources import files
from typing import Annotated, Any, Literal

from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from airflow_provider_modeldeploy import __version__
from airflow_provider_modeldeploy.exceptions import (
    AgentUnreachableError,
    DeploymentFailedError,
    EndpointBusyError,
    InvalidParameterError,
    ModelDeployError,
    RegistryUnavailableError,
    ServiceNotFoundError,
)
from airflow_provider_modeldeploy.registry.store import HOSTNAME
from airflow_provider_modeldeploy.services import ServiceRecord, ServiceState

log = logging.getLogger(__name__)

URL_PREFIX = "/served-models"
RESOURCE_NAME = "Served Models"
SORTABLE = Literal["updated_at", "created_at", "model_name", "model_version", "state", "backend", "endpoint", "dag_id"]
_SECRET_KEY = re.compile(r"pass|secret|token|credential|auth|key", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(://[^/:@\s]+):[^@/\s]+@")
_UUID = Annotated[str, Path(min_length=4, max_length=64, pattern=r"^[0-9a-fA-F-]+$", description="service uuid")]

# How each state reads on the page: text always, colour only as a second cue.
STATE_LABELS = {
    ServiceState.ACTIVE: "Running",
    ServiceState.PENDING: "Starting",
    ServiceState.INACTIVE: "Stopped",
    ServiceState.ERROR: "Failed",
}

_bearer = HTTPBearer(auto_error=False)


# -- authentication and authorization ------------------------------------------------------------


async def current_user(
    request: Request, bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> BaseUser:
    """The Airflow user of this request, resolved by Airflow's own ``get_user`` (401 when none)."""
    from airflow.api_fastapi.core_api.security import get_user

    return await get_user(request, None, bearer)


def _auth_manager() -> Any:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager()


def can_read(user: BaseUser) -> bool:
    return bool(_auth_manager().is_authorized_custom_view(method="GET", resource_name=RESOURCE_NAME, user=user))


def can_act(user: BaseUser, method: str, dag_id: str | None = None) -> bool:
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

    manager = _auth_manager()
    return bool(
        manager.is_authorized_custom_view(method=method, resource_name=RESOURCE_NAME, user=user)
        and manager.is_authorized_dag(method="PUT", details=DagDetails(id=dag_id) if dag_id else None, user=user)
    )


def reader(user: User) -> BaseUser:
    if not can_read(user):
        raise HTTPException(status_code=403, detail=f"{user.get_name()} may not view {RESOURCE_NAME}")
    return user


Reader = Annotated[BaseUser, Depends(reader)]
User = Annotated[BaseUser, Depends(current_user)]


def _require_act(user: BaseUser, method: str, record: ServiceRecord) -> None:
    if not can_act(user, method, record.dag_id):
        raise HTTPException(
            status_code=403,
            detail=f"{user.get_name()} may not change served model {record.uuid} "
            f"(needs edit permission on {RESOURCE_NAME} and on DAG {record.dag_id or '*'})",
        )


def actor_of(user: BaseUser) -> str:
    return f"{user.get_name()} (Airflow UI on {HOSTNAME})"


# -- data ----------------------------------------------------------------------------------------


def _registry() -> Any:
    from airflow_provider_modeldeploy.registry import get_registry

    return get_registry()


def airflow_base(request: Request) -> str:
    """Airflow's UI root as seen by the browser (the mount's root_path minus our prefix)."""
    root = request.scope.get("root_path", "") or ""
    return root[: -len(URL_PREFIX)] if root.endswith(URL_PREFIX) else root


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


def _mask(value: Any) -> Any:
    """Backend options with secret-looking names are never shown, whatever their nesting."""
    if isinstance(value, dict):
        return {k: ("***" if _SECRET_KEY.search(str(k)) else _mask(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    if isinstance(value, str):
        # Tracking or registry URLs may carry user:password@.
        return _URL_PASSWORD.sub(r"\1:***@", value)
    return value


def service_json(record: ServiceRecord, base: str) -> dict[str, Any]:
    data = record.to_dict()
    data["config"] = _mask(data.get("config") or {})
    data["last_error"] = _mask(record.last_error)
    data["status_label"] = STATE_LABELS.get(record.state, str(record.state))
    data["live"] = record.state == ServiceState.ACTIVE
    links: dict[str, str | None] = {"detail": f"{base}{URL_PREFIX}/services/{record.uuid}"}
    if record.dag_id:
        links["dag"] = f"{base}/dags/{_quote(record.dag_id)}"
    if record.dag_id and record.run_id:
        run = f"{base}/dags/{_quote(record.dag_id)}/runs/{_quote(record.run_id)}"
        links["dag_run"] = run
        if record.task_id:
            task = f"{run}/tasks/{_quote(record.task_id)}"
            links["task_instance"] = f"{task}/mapped/{record.map_index}" if record.map_index >= 0 else task
    data["links"] = links
    return data


def _xcom_records(record: ServiceRecord) -> list[dict[str, Any]] | str:
    """The XCom values the deploying task pushed, from Airflow's metadata DB (the API server may read it)."""
    if not (record.dag_id and record.run_id and record.task_id):
        return []
    try:
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            rows = session.execute(
                select(XComModel.key, XComModel.value, XComModel.timestamp).where(
                    XComModel.dag_id == record.dag_id,
                    XComModel.run_id == record.run_id,
                    XComModel.task_id == record.task_id,
                    XComModel.map_index == record.map_index,
                )
            ).all()
    except Exception as exc:  # the metadata DB is Airflow's: report, do not fail the page
        return f"XCom unavailable: {type(exc).__name__}"
    out = []
    for key, value, timestamp in rows:
        out.append({"key": key, "value": _mask(_decode_xcom(value)), "timestamp": timestamp.isoformat()})
    return out


def _decode_xcom(value: Any) -> Any:
    import json

    if isinstance(value, bytes | str):
        try:
            return json.loads(value)
        except ValueError:
            return str(value)[:2000]
    return value


# -- request and response models (they make the OpenAPI schema) --------------------------------


class ServicePage(BaseModel):
    total: int
    limit: int
    offset: int
    can_act: bool = Field(description="whether this user may start, stop, delete and roll back")
    services: list[dict[str, Any]]


class ActionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timeout: int = Field(60, ge=1, le=900, description="seconds to wait for the server")
    force: bool = Field(False, description="stop without draining in-flight requests")


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to_service_uuid: str | None = Field(
        None, min_length=4, max_length=64, pattern=r"^[0-9a-fA-F-]+$", description="earlier service, from history"
    )
    timeout: int = Field(300, ge=1, le=900)


class ActionResult(BaseModel):
    ok: bool
    message: str
    service: dict[str, Any] | None = None


# -- the app -------------------------------------------------------------------------------------


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message, **extra})


def create_app() -> FastAPI:
    app = FastAPI(
        title="Served Models",
        version=__version__,
        description="Model servers tracked by airflow-provider-modeldeploy. Every route needs an Airflow "
        "user: `Authorization: Bearer <token from POST /auth/token>` or the UI's session cookie.",
        # FastAPI's own schema and docs routes would be unauthenticated: ours is below, behind reader.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )

    @app.exception_handler(ModelDeployError)
    async def _model_deploy_error(request: Request, exc: ModelDeployError) -> JSONResponse:
        extra = {"field": exc.field, "value": str(exc.value)} if isinstance(exc, InvalidParameterError) else {}
        status = 400
        if isinstance(exc, ServiceNotFoundError):
            status = 404
            extra = {"field": exc.field, "value": str(exc.value)}
        elif isinstance(exc, EndpointBusyError | DeploymentFailedError):
            status = 409
        elif isinstance(exc, RegistryUnavailableError | AgentUnreachableError):
            status = 503
        if _wants_html(request):
            return _html_message(request, str(exc), status)
        return _error(status, str(exc), **extra)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        # People who open the page signed out get a sentence and a way in, not a JSON body.
        if _wants_html(request):
            text = "Please sign in to Airflow" if exc.status_code == 401 else str(exc.detail)
            return _html_message(request, text, exc.status_code)
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("Served Models: %s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the API server's log")

    # -- pages --

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def list_page(request: Request, user: Reader) -> HTMLResponse:
        return _page(request, user, "list", None)

    @app.get("/services/{uuid}", response_class=HTMLResponse, include_in_schema=False)
    def detail_page(request: Request, user: Reader, uuid: _UUID) -> HTMLResponse:
        record = _registry().get_service(uuid)
        return _page(request, user, "detail", record)

    # -- JSON API --

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi(user: Reader) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/api/services", response_model=ServicePage, summary="One page of services")
    def list_services(
        request: Request,
        user: Reader,
        model: Annotated[str | None, Query(max_length=200, description="model name or endpoint contains")] = None,
        dag_id: Annotated[str | None, Query(max_length=250, description="DAG id contains")] = None,
        state: Annotated[list[ServiceState] | None, Query(description="any of these states")] = None,
        backend: Annotated[str | None, Query(max_length=100)] = None,
        sort: SORTABLE = "updated_at",
        order: Literal["asc", "desc"] = "desc",
        limit: Annotated[int, Query(ge=1, le=500)] = 25,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> ServicePage:
        records, total = _registry().page_services(
            model=model, dag_id=dag_id, states=state, backend=backend, sort=sort,
            descending=order == "desc", limit=limit, offset=offset,
        )  # fmt: skip
        base = airflow_base(request)
        return ServicePage(
            total=total, limit=limit, offset=offset, can_act=can_act(user, "POST"),
            services=[service_json(r, base) for r in records],
        )  # fmt: skip

    @app.get("/api/services/{uuid}", summary="Everything about one service: properties, lineage, history")
    def get_service(request: Request, user: Reader, uuid: _UUID) -> dict[str, Any]:
        registry = _registry()
        record = registry.get_service(uuid)
        return {
            "service": service_json(record, airflow_base(request)),
            "lineage": {
                "airflow": {
                    "dag_id": record.dag_id,
                    "run_id": record.run_id,
                    "task_id": record.task_id,
                    "map_index": record.map_index,
                    "try_number": record.try_number,
                    "xcom": _xcom_records(record),
                },
                "mlflow": {
                    "model_name": record.model_name,
                    "model_version": record.model_version,
                    "model_run_id": record.model_run_id,
                    "model_uri": record.model_uri,
                    "served_uri": record.served_uri,
                },
            },
            "history": [_mask(e) for e in registry.list_events(record.backend, record.endpoint, limit=50)],
            "can_act": can_act(user, "POST", record.dag_id),
        }

    @app.get("/api/services/{uuid}/logs", summary="The last lines of the model server's log")
    def get_logs(user: Reader, uuid: _UUID, tail: Annotated[int, Query(ge=1, le=2000)] = 100) -> dict[str, Any]:
        from airflow_provider_modeldeploy.deployers import deployer_for_service

        record = _registry().get_service(uuid)
        try:
            lines = list(deployer_for_service(record.uuid).get_model_server_logs(record.uuid, tail=tail))
        except ServiceNotFoundError:
            raise
        except ModelDeployError as exc:
            return {"lines": [], "message": str(exc)}
        return {"lines": lines, "message": None}

    @app.get("/api/services/{uuid}/health", summary="Probe the server's health URL now")
    def get_health(user: Reader, uuid: _UUID) -> dict[str, Any]:
        from airflow_provider_modeldeploy.health import check_health

        record = _registry().get_service(uuid)
        if record.state != ServiceState.ACTIVE or not record.health_url:
            return {"healthy": False, "message": f"not probed: the service is {record.state}"}
        healthy, message = check_health(record.health_url)
        return {"healthy": healthy, "message": message}

    @app.post("/api/services/{uuid}/start", response_model=ActionResult, summary="Start a stopped service")
    def start(request: Request, user: User, uuid: _UUID, body: ActionBody) -> ActionResult:
        service = _acting(user, uuid, "POST")
        service.start(timeout=body.timeout, actor=actor_of(user))
        return ActionResult(
            ok=True, message=f"started {service.uuid}", service=service_json(service.record, airflow_base(request))
        )

    @app.post("/api/services/{uuid}/stop", response_model=ActionResult, summary="Stop a service's server")
    def stop(request: Request, user: User, uuid: _UUID, body: ActionBody) -> ActionResult:
        service = _acting(user, uuid, "POST")
        service.stop(timeout=body.timeout, force=body.force, actor=actor_of(user))
        return ActionResult(
            ok=True, message=f"stopped {service.uuid}", service=service_json(service.record, airflow_base(request))
        )

    @app.post("/api/services/{uuid}/rollback", response_model=ActionResult, summary="Serve an earlier version again")
    def rollback(request: Request, user: User, uuid: _UUID, body: RollbackBody) -> ActionResult:
        service = _acting(user, uuid, "POST")
        restored = service.rollback(body.to_service_uuid, timeout=body.timeout, actor=actor_of(user))
        return ActionResult(
            ok=True, message=f"{restored.record.endpoint} serves {restored.record.model_uri} again",
            service=service_json(restored.record, airflow_base(request)),
        )  # fmt: skip

    @app.delete("/api/services/{uuid}", response_model=ActionResult, summary="Stop and remove a service")
    def delete(user: User, uuid: _UUID) -> ActionResult:
        service = _acting(user, uuid, "DELETE")
        service.delete(timeout=60, actor=actor_of(user))
        return ActionResult(ok=True, message=f"deleted {service.uuid}")

    return app


def _acting(user: BaseUser, uuid: str, method: str) -> Any:
    """The service to act on, once the user may: 403 before any deployer or backend is touched."""
    from airflow_provider_modeldeploy.deployers import deployer_for_service

    if not can_read(user):
        raise HTTPException(status_code=403, detail=f"{user.get_name()} may not view {RESOURCE_NAME}")
    record = _registry().get_service(uuid)
    _require_act(user, method, record)
    return deployer_for_service(record.uuid).service_for(record)


def _wants_html(request: Request) -> bool:
    return "/api/" not in request.url.path and "text/html" in request.headers.get("accept", "")


def _html_message(request: Request, text: str, status: int) -> HTMLResponse:
    """A sentence and a way back, for people: the pages never show JSON errors or tracebacks."""
    base = airflow_base(request)
    body = (
        f"<!doctype html><title>Served Models</title><p>{_html(text)}.</p>"
        f'<p><a href="{base}{URL_PREFIX}/">Served Models</a> · <a href="{base}/" target="_top">Airflow</a></p>'
    )
    return HTMLResponse(body, status_code=status)


def _html(text: str) -> str:
    import html

    return html.escape(text, quote=True)


_TEMPLATE_CACHE: dict[str, Any] = {}


def _page(request: Request, user: BaseUser, view: str, record: ServiceRecord | None) -> HTMLResponse:
    import json

    import jinja2

    if "env" not in _TEMPLATE_CACHE:
        source = files("airflow_provider_modeldeploy.plugins").joinpath("templates")
        _TEMPLATE_CACHE["env"] = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(source)), autoescape=True, undefined=jinja2.StrictUndefined
        )
    base = airflow_base(request)
    context = {
        "view": view,
        "uuid": record.uuid if record else "",
        "user": user.get_name(),
        "can_act": can_act(user, "POST", record.dag_id if record else None),
        "api": f"{base}{URL_PREFIX}/api",
        "home": f"{base}{URL_PREFIX}/",
        "airflow": f"{base}/",
        "states": [{"value": str(s), "label": STATE_LABELS[s]} for s in ServiceState],
    }
    html = (
        _TEMPLATE_CACHE["env"]
        .get_template("served_models.html")
        .render(ctx=context, ctx_json=json.dumps(context).replace("<", "\\u003c"), version=__version__)
    )
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})
