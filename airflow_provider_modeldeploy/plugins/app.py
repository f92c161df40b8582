"""The "Served Models" FastAPI app: two HTML pages (list, detail) and the JSON API they call.

Who may see and change what is ``authz``'s (Airflow's auth manager, per DAG); long actions run in
``actions``' bounded pool; everything shown goes through ``masking.mask``.

Nothing here is backend-specific: rows come from the registry, actions go through the deployer that
manages each service (``deployer_for_service``), whatever its backend.
"""

from __future__ import annotations

import logging
from importlib.resources import files
from typing import Annotated, Any, Literal

from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
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
from airflow_provider_modeldeploy.masking import mask, mask_text
from airflow_provider_modeldeploy.plugins import actions
from airflow_provider_modeldeploy.plugins.authz import (
    PAGE_HEADER,
    Reader,
    Writer,
    may_act,
    may_read_dag,
    require_act,
    require_read,
    visibility,
)
from airflow_provider_modeldeploy.plugins.try_request import try_section
from airflow_provider_modeldeploy.registry.store import HOSTNAME
from airflow_provider_modeldeploy.services import ServiceRecord, ServiceState

log = logging.getLogger(__name__)

URL_PREFIX = "/served-models"
SORTABLE = Literal["updated_at", "created_at", "model_name", "model_version", "state", "backend", "endpoint", "dag_id"]
_UUID = Annotated[str, Path(min_length=4, max_length=64, pattern=r"^[0-9a-fA-F-]+$", description="service uuid")]
#: What a viewer reads when the registry fails: its URL names the database's user and host.
REGISTRY_DOWN = "the served-models registry is unavailable (the API server log says why)"

# How each state reads on the page: text always, colour only as a second cue.
STATE_LABELS = {
    ServiceState.ACTIVE: "Running",
    ServiceState.PENDING: "Starting",
    ServiceState.INACTIVE: "Stopped",
    ServiceState.ERROR: "Failed",
}


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


def service_json(record: ServiceRecord, base: str) -> dict[str, Any]:
    data = mask(record.to_dict())
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


def _xcom_records(user: BaseUser, record: ServiceRecord) -> list[dict[str, Any]] | str:
    """The XCom values the deploying task pushed, from Airflow's metadata DB (the API server may read
    it), to those Airflow lets read that DAG's XComs."""
    if not (record.dag_id and record.run_id and record.task_id):
        return []
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity

    if not may_read_dag(user, record.dag_id, DagAccessEntity.XCOM):
        return f"XCom hidden: {user.get_name()} may not read the XComs of DAG {record.dag_id}"
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
    return [
        {"key": key, "value": mask(_decode_xcom(value)), "timestamp": timestamp.isoformat()}
        for key, value, timestamp in rows
    ]


def _decode_xcom(value: Any) -> Any:
    import json

    if isinstance(value, bytes | str):
        try:
            return json.loads(value)
        except ValueError:
            return str(value)[:2000]
    return value


def _readable(user: BaseUser, uuid: str) -> ServiceRecord:
    """The service, once the user may read it: 403 before anything of it is shown."""
    record = _registry().get_service(uuid)
    require_read(user, record)
    return record


# -- request and response models (they make the OpenAPI schema) --------------------------------


class ServicePage(BaseModel):
    total: int
    limit: int
    offset: int
    can_act: bool = Field(description="whether this user may start, stop, delete and roll back")
    services: list[dict[str, Any]]


class ActionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timeout: int = Field(60, ge=1, le=900, description="seconds the backend may take")
    force: bool = Field(False, description="stop without draining in-flight requests")
    wait: float = Field(10, ge=0, le=30, description="seconds to wait for the outcome before answering 202")


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to_service_uuid: str | None = Field(
        None, min_length=4, max_length=64, pattern=r"^[0-9a-fA-F-]+$", description="earlier service, from history"
    )
    timeout: int = Field(300, ge=1, le=900)
    wait: float = Field(10, ge=0, le=30, description="seconds to wait for the outcome before answering 202")


class ActionResult(BaseModel):
    ok: bool
    message: str
    service: dict[str, Any] | None = None
    action: dict[str, Any] | None = Field(None, description="the action's progress (202: poll action.status_url)")


# -- errors --------------------------------------------------------------------------------------


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": mask_text(message), **extra})


def error_status(exc: BaseException) -> tuple[int, str]:
    """The status code and the sentence a viewer may read for a failure (never the registry's URL)."""
    if isinstance(exc, HTTPException):
        return exc.status_code, str(exc.detail)
    if isinstance(exc, RegistryUnavailableError):
        log.error("Served Models: %s", mask_text(str(exc)))
        return 503, REGISTRY_DOWN
    if isinstance(exc, ServiceNotFoundError):
        return 404, str(exc)
    if isinstance(exc, EndpointBusyError | DeploymentFailedError):
        return 409, str(exc)
    if isinstance(exc, AgentUnreachableError):
        return 503, str(exc)
    if isinstance(exc, ModelDeployError):
        return 400, str(exc)
    log.error("Served Models: an action failed", exc_info=exc)
    return 500, f"internal error ({type(exc).__name__}); see the API server's log"


# -- the app -------------------------------------------------------------------------------------


def create_app() -> FastAPI:
    app = FastAPI(
        title="Served Models",
        version=__version__,
        description="Model servers tracked by airflow-provider-modeldeploy. Every route needs an Airflow "
        "user: `Authorization: Bearer <token from POST /auth/token>` or the UI's session cookie (writes "
        f"with the cookie also need a same-origin `Origin` or the `{PAGE_HEADER}: 1` header).",
        # FastAPI's own schema and docs routes would be unauthenticated: ours is below, behind reader.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )

    @app.exception_handler(ModelDeployError)
    async def _model_deploy_error(request: Request, exc: ModelDeployError) -> Response:
        status, message = error_status(exc)
        extra: dict[str, Any] = {}
        if isinstance(exc, InvalidParameterError | ServiceNotFoundError):
            extra = {"field": exc.field, "value": mask_text(str(exc.value))}
        if _wants_html(request):
            return _html_message(request, message, status)
        return _error(status, message, **extra)

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
        return _page(request, user, "detail", _readable(user, uuid))

    # -- JSON API: reads --

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi(user: Reader) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/api/services", response_model=ServicePage, summary="One page of the services this user may read")
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
        registry = _registry()
        seen = visibility(user, registry.dag_ids())
        records, total = registry.page_services(
            model=model, dag_id=dag_id, states=state, backend=backend, sort=sort,
            descending=order == "desc", limit=limit, offset=offset,
            only_dag_ids=seen.dag_ids, with_no_dag=seen.no_dag,
        )  # fmt: skip
        base = airflow_base(request)
        return ServicePage(
            total=total, limit=limit, offset=offset, can_act=may_act(user, "POST"),
            services=[service_json(r, base) for r in records],
        )  # fmt: skip

    @app.get("/api/services/{uuid}", summary="Everything about one service: properties, lineage, history")
    def get_service(request: Request, user: Reader, uuid: _UUID) -> dict[str, Any]:
        record = _readable(user, uuid)
        history = _registry().list_events(record.backend, record.endpoint, limit=50)
        return {
            "service": service_json(record, airflow_base(request)),
            "lineage": mask(
                {
                    "airflow": {
                        "dag_id": record.dag_id,
                        "run_id": record.run_id,
                        "task_id": record.task_id,
                        "map_index": record.map_index,
                        "try_number": record.try_number,
                        "xcom": _xcom_records(user, record),
                    },
                    "mlflow": {
                        "model_name": record.model_name,
                        "model_version": record.model_version,
                        "model_run_id": record.model_run_id,
                        "model_uri": record.model_uri,
                        "served_uri": record.served_uri,
                    },
                }
            ),
            "history": mask(history),
            # A ready-to-paste request for the prediction URL, from the model's recorded signature.
            "try": try_section(record, history),
            "can_act": may_act(user, "POST", record.dag_id),
        }

    @app.get("/api/services/{uuid}/logs", summary="The last lines of the model server's log")
    def get_logs(user: Reader, uuid: _UUID, tail: Annotated[int, Query(ge=1, le=2000)] = 100) -> dict[str, Any]:
        from airflow_provider_modeldeploy.deployers import deployer_for_service

        record = _readable(user, uuid)
        try:
            lines = list(deployer_for_service(record.uuid).get_model_server_logs(record.uuid, tail=tail))
        except ServiceNotFoundError:
            raise
        except ModelDeployError as exc:
            return {"lines": [], "message": error_status(exc)[1]}
        return {"lines": [mask_text(line) for line in lines], "message": None}

    @app.get("/api/services/{uuid}/health", summary="Probe the server's health URL now")
    def get_health(user: Reader, uuid: _UUID) -> dict[str, Any]:
        from airflow_provider_modeldeploy.health import check_health

        record = _readable(user, uuid)
        if record.state != ServiceState.ACTIVE or not record.health_url:
            return {"healthy": False, "message": f"not probed: the service is {record.state}"}
        healthy, message = check_health(record.health_url)
        return {"healthy": healthy, "message": mask_text(message)}

    @app.get("/api/actions/{action_id}", response_model=ActionResult, summary="Progress of a start/stop/...")
    def get_action(
        request: Request, user: Reader, action_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]
    ) -> JSONResponse:
        action = actions.runner().get(action_id)
        if action is None or not all(may_read_dag(user, dag_id) for dag_id in action.dag_ids):
            raise HTTPException(
                status_code=404,
                detail=f"action {action_id} is not known to this API server process; see the service's state",
            )
        return _action_result(request, action)

    from airflow_provider_modeldeploy.plugins import metrics_api

    metrics_api.add_routes(app)

    # -- JSON API: actions (bounded pool, 202 with progress when slow) --

    @app.post("/api/services/{uuid}/start", response_model=ActionResult, summary="Start a stopped service")
    async def start(request: Request, user: Writer, uuid: _UUID, body: ActionBody) -> Response:
        def work(service: Any) -> tuple[str, dict[str, Any] | None]:
            started = service.start(timeout=body.timeout, actor=actor_of(user))
            return f"started {started.uuid}", service_json(started.record, airflow_base(request))

        return await _run(request, user, uuid, "start", "POST", body.wait, work)

    @app.post("/api/services/{uuid}/stop", response_model=ActionResult, summary="Stop a service's server")
    async def stop(request: Request, user: Writer, uuid: _UUID, body: ActionBody) -> Response:
        def work(service: Any) -> tuple[str, dict[str, Any] | None]:
            stopped = service.stop(timeout=body.timeout, force=body.force, actor=actor_of(user))
            return f"stopped {stopped.uuid}", service_json(stopped.record, airflow_base(request))

        return await _run(request, user, uuid, "stop", "POST", body.wait, work)

    @app.post("/api/services/{uuid}/rollback", response_model=ActionResult, summary="Serve an earlier version again")
    async def rollback(request: Request, user: Writer, uuid: _UUID, body: RollbackBody) -> Response:
        def work(service: Any) -> tuple[str, dict[str, Any] | None]:
            restored = service.rollback(body.to_service_uuid, timeout=body.timeout, actor=actor_of(user))
            return (
                f"{restored.record.endpoint} serves {restored.record.model_uri} again",
                service_json(restored.record, airflow_base(request)),
            )

        def target_dag(service: Any) -> tuple[str | None]:
            # Authorized against the version brought back too (its DAG; all DAGs when not recorded).
            return (service.deployer.rollback_target(service.uuid, body.to_service_uuid).get("dag_id"),)

        return await _run(request, user, uuid, "rollback", "POST", body.wait, work, target_dag)

    @app.post("/api/services/{uuid}/promote", response_model=ActionResult, summary="Give a canary all the traffic")
    async def promote(request: Request, user: Writer, uuid: _UUID, body: ActionBody) -> Response:
        def work(service: Any) -> tuple[str, dict[str, Any] | None]:
            promoted = service.promote(timeout=body.timeout, actor=actor_of(user))
            return (
                f"{promoted.record.endpoint}: canary {promoted.uuid} takes all the traffic",
                service_json(promoted.record, airflow_base(request)),
            )

        return await _run(request, user, uuid, "promote", "POST", body.wait, work)

    @app.delete("/api/services/{uuid}", response_model=ActionResult, summary="Stop and remove a service")
    async def delete(request: Request, user: Writer, uuid: _UUID, wait: Annotated[float, Query(ge=0, le=30)] = 10):
        def work(service: Any) -> tuple[str, dict[str, Any] | None]:
            service.delete(timeout=60, actor=actor_of(user))
            return f"deleted {service.uuid}", None

        return await _run(request, user, uuid, "delete", "DELETE", wait, work)

    return app


async def _run(
    request: Request,
    user: BaseUser,
    uuid: str,
    kind: str,
    method: str,
    wait: float,
    work: Any,
    other_dags: Any = None,
) -> Response:
    """Authorize, then run ``work(service)`` in the bounded pool; 200 with its outcome if it ends
    within ``wait`` seconds, else 202 with the action to poll."""

    def authorize() -> tuple[Any, tuple[str | None, ...]]:
        from airflow_provider_modeldeploy.deployers import deployer_for_service

        record = _registry().get_service(uuid)
        require_act(user, method, record)  # before the backend is touched or anything else is said
        service = deployer_for_service(record.uuid).service_for(record)
        extra = other_dags(service) if other_dags else ()
        if extra:
            require_act(user, method, record, *extra)
        return service, (record.dag_id, *extra)

    # Short registry and auth-manager reads: Starlette's pool is fine for them, the action is not.
    service, dag_ids = await run_in_threadpool(authorize)
    try:
        action = actions.runner().submit(
            kind, service.uuid, dag_ids, user.get_name(), lambda: work(service), error_status
        )
    except actions.ServiceBusy as exc:
        return _error(409, str(exc), action=exc.action.to_json(f"{airflow_base(request)}{URL_PREFIX}"))
    except actions.TooBusy as exc:
        return JSONResponse(status_code=429, content={"detail": str(exc)}, headers={"Retry-After": "5"})
    await actions.wait(action, wait)
    return _action_result(request, action)


def _action_result(request: Request, action: actions.Action) -> JSONResponse:
    progress = action.to_json(f"{airflow_base(request)}{URL_PREFIX}")
    if action.state == "running":
        return JSONResponse(
            status_code=202,
            content={"ok": True, "message": f"{action.kind} of {action.service_uuid} is under way", "action": progress},
            headers={"Location": progress["status_url"]},
        )
    if action.state == "failed":
        return _error(action.status_code, action.message, action=progress)
    return JSONResponse(
        status_code=200, content={"ok": True, "message": mask_text(action.message), "service": action.service,
                                  "action": progress},
    )  # fmt: skip


def _wants_html(request: Request) -> bool:
    return "/api/" not in request.url.path and "text/html" in request.headers.get("accept", "")


def _html_message(request: Request, text: str, status: int) -> HTMLResponse:
    """A sentence and a way back, for people: the pages never show JSON errors or tracebacks."""
    base = airflow_base(request)
    links = [f'<a href="{base}{URL_PREFIX}/">Served Models</a>', f'<a href="{base}/" target="_top">Airflow</a>']
    if status == 401:  # the way in: Airflow's login (whichever auth manager), which brings the browser back here
        back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        links.insert(
            0, f'<a id="sign-in" href="{base}/api/v2/auth/login?next={_quote(back)}" target="_top">Sign in</a>'
        )
    body = f"<!doctype html><title>Served Models</title><p>{_html(mask_text(text))}.</p><p>{' · '.join(links)}</p>"
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
        "can_act": may_act(user, "POST", record.dag_id if record else None),
        "page_header": PAGE_HEADER,
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
