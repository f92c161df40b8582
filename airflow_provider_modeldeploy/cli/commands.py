"""Implementations of ``airflow served-models`` commands. Errors print one line, no traceback."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from airflow_provider_modeldeploy.exceptions import ModelDeployError
from airflow_provider_modeldeploy.masking import mask, mask_text

F = TypeVar("F", bound=Callable[..., Any])

LIST_FIELDS = (
    "uuid", "state", "model_name", "model_version", "endpoint", "backend", "dag_id", "task_id", "run_id",
    "prediction_url", "last_error", "updated_at",
)  # fmt: skip
TABLE_FIELDS = ("uuid", "state", "model_name", "model_version", "backend", "dag_id", "task_id", "prediction_url")


_OUT: list[Any] = []  # the command's real stdout, while its logs go to stderr (see cli_errors)


def _out() -> Any:
    return _OUT[-1] if _OUT else sys.stdout


def _fail(message: str) -> None:
    print(f"error: {mask_text(message)}", file=sys.stderr)
    sys.exit(1)


def cli_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(args: Any) -> Any:
        import logging

        if not getattr(args, "verbose", False):
            for name in ("alembic", "airflow_provider_modeldeploy", "httpx"):
                logging.getLogger(name).setLevel(logging.WARNING)
        # Only what the command prints goes to stdout, so that `-o json | jq` works: Airflow logs some
        # warnings there (e.g. on connection types with "_", read from the metadata database).
        _OUT.append(sys.stdout)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                return func(args)
        except ModelDeployError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted")
        finally:
            _OUT.pop()

    return wrapper  # type: ignore[return-value]


def _print(data: list[dict[str, Any]], output: str) -> None:
    """Everything the commands show goes through here, masked (``masking.mask``)."""
    from airflow.cli.simple_table import AirflowConsole

    with contextlib.redirect_stdout(_out()):  # its plain tables use print()
        AirflowConsole(file=_out()).print_as(data=mask(data), output=output)


def _row(service: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    data = service.to_dict()
    return {key: data.get(key) for key in fields}


def _service(uuid: str) -> Any:
    from airflow_provider_modeldeploy.deployers import deployer_for_service

    deployer = deployer_for_service(uuid)
    return deployer.get_model_server(uuid)


@cli_errors
def list_services(args: Any) -> None:
    from airflow_provider_modeldeploy.deployers import find_services

    services = find_services(
        model_name=args.model, dag_id=args.dag_id, task_id=args.task_id,
        running=True if args.running else None, limit=args.limit, offset=args.offset,
    )  # fmt: skip
    fields = TABLE_FIELDS if args.output in ("table", "plain") else LIST_FIELDS
    _print([_row(s, fields) for s in services], args.output)


@cli_errors
def describe_service(args: Any) -> None:
    service = _service(args.uuid)
    data = mask(service.to_dict())  # masked before the table joins config into one string
    history = service.deployer.get_history(service.uuid, limit=args.history) if args.history else []
    metrics = last_hour(service)
    if args.output in ("json", "yaml"):
        _print([{**data, "history": history, "metrics": metrics}], args.output)
        return
    rows = [{"property": k, "value": v if not isinstance(v, dict) else ", ".join(f"{a}={b}" for a, b in v.items())}
            for k, v in data.items()]  # fmt: skip
    _print(rows, args.output)
    print(file=_out())
    _print(_metrics_rows(metrics), args.output)
    if history:
        print(file=_out())
        _print(
            [{k: e[k] for k in ("created_at", "action", "outcome", "actor", "message")} for e in history], args.output
        )


def last_hour(service: Any) -> dict[str, Any]:
    """The service's last hour (the Served Models API's summary), or why there is none."""
    try:
        result = service.deployer.metrics(service.uuid, "1h")
    except ModelDeployError as exc:
        return {"window": "1h", "available": False, "reason": mask_text(str(exc))}
    out: dict[str, Any] = {"window": "1h", "available": result.available, "source": result.source}
    out["reason"] = mask_text(result.reason) if result.reason else None
    if result.available:
        summary = result.summary
        out.update(
            requests=summary.requests, requests_per_minute=summary.requests_per_minute, errors=summary.errors,
            error_rate=summary.error_rate, p50_ms=summary.p50_ms, p95_ms=summary.p95_ms, p99_ms=summary.p99_ms,
            in_flight=summary.in_flight, rows=summary.rows,
        )  # fmt: skip
    return out


def _metrics_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    if not metrics["available"]:
        return [{"last hour": "metrics", "value": f"not available: {metrics['reason']}"}]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} ms"

    rate = metrics["error_rate"]
    return [
        {"last hour": "requests", "value": metrics["requests"]},
        {"last hour": "requests per minute", "value": f"{metrics['requests_per_minute']:.2f}"},
        {"last hour": "error rate", "value": "-" if rate is None else f"{rate:.2%} ({metrics['errors']} errors)"},
        {
            "last hour": "latency p50 / p95 / p99",
            "value": " / ".join(ms(metrics[k]) for k in ("p50_ms", "p95_ms", "p99_ms")),
        },
        {"last hour": "in flight", "value": "-" if metrics["in_flight"] is None else metrics["in_flight"]},
        {"last hour": "rows", "value": metrics["rows"]},
    ]


@cli_errors
def get_url(args: Any) -> None:
    service = _service(args.uuid)
    if not service.is_running:
        _fail(f"uuid={service.uuid!r}: the service is {service.status.state}, it has no live prediction URL")
    print(mask_text(service.prediction_url), file=_out())


@cli_errors
def show_logs(args: Any) -> None:
    from airflow_provider_modeldeploy.deployers import deployer_for_service

    deployer = deployer_for_service(args.uuid)
    try:
        for line in deployer.get_model_server_logs(args.uuid, tail=args.tail, follow=args.follow):
            print(mask_text(line), flush=args.follow, file=_out())
    except KeyboardInterrupt:
        if not args.follow:
            raise
        # Ctrl-C is how one stops following: the command did what was asked (exit 0).


@cli_errors
def start_service(args: Any) -> None:
    service = _service(args.uuid).start(timeout=args.timeout)
    _print([_row(service, TABLE_FIELDS)], args.output)


@cli_errors
def stop_service(args: Any) -> None:
    service = _service(args.uuid).stop(timeout=args.timeout, force=args.force)
    _print([_row(service, TABLE_FIELDS)], args.output)


@cli_errors
def promote_service(args: Any) -> None:
    service = _service(args.uuid).promote(timeout=args.timeout)
    _print([_row(service, TABLE_FIELDS)], args.output)


@cli_errors
def rollback_service(args: Any) -> None:
    service = _service(args.uuid).rollback(args.to, timeout=args.timeout)
    _print([_row(service, TABLE_FIELDS)], args.output)


@cli_errors
def delete_service(args: Any) -> None:
    service = _service(args.uuid)
    if not args.yes:
        if not sys.stdin.isatty():
            _fail(f"uuid={service.uuid!r}: refusing to delete without confirmation; pass --yes")
        answer = input(f"Delete service {service.uuid} ({service.record.model_name}, {service.status.state})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("Cancelled.", file=_out())
            return
    service.delete(timeout=args.timeout, force=args.force)
    print(f"Deleted service {service.uuid}", file=_out())


@cli_errors
def render_manifest(args: Any) -> None:
    """The manifest a deploy would send to the cluster, validated; nothing is sent or recorded."""
    import json

    import yaml

    from airflow_provider_modeldeploy.deployers import ServiceConfig, get_model_deployer
    from airflow_provider_modeldeploy.exceptions import InvalidParameterError

    options: dict[str, Any] = {}
    for item in args.options or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidParameterError("option", item, "use KEY=VALUE (VALUE as JSON, or a string)")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    deployer = get_model_deployer(args.deploy_conn_id)
    config = ServiceConfig(model_uri=args.model_uri, model_name=args.model_name, endpoint=args.endpoint, **options)
    manifest = mask(deployer.render(config))
    print(
        json.dumps(manifest, indent=2) if args.format == "json" else yaml.safe_dump(manifest, sort_keys=False),
        file=_out(),
    )


@cli_errors
def sync_services(args: Any) -> None:
    from airflow_provider_modeldeploy.deployers import sync_all

    reports = sync_all(args.conn_ids or [], dry_run=args.dry_run)
    _print(
        [
            {**r.to_dict(), **{k: ", ".join(v) or "-" for k, v in r.to_dict().items() if isinstance(v, list)}}
            for r in reports
        ]
        if args.output in ("table", "plain")
        else [r.to_dict() for r in reports],
        args.output,
    )


@cli_errors
def run_agent(args: Any) -> None:
    """The serving agent of this host, in the foreground until SIGTERM / Ctrl-C; its model servers keep
    serving after it stops, and the next agent adopts them."""
    import logging
    import os

    from airflow_provider_modeldeploy import config
    from airflow_provider_modeldeploy.exceptions import InvalidParameterError
    from airflow_provider_modeldeploy.hooks.serving_agent import agent_token, local_agent
    from airflow_provider_modeldeploy.serving import agent_api

    if args.check:
        health = local_agent(start=False).health()
        print(
            f"serving agent {health['agent_id']} (pid {health['pid']}) answers; {health['services']} services",
            file=_out(),
        )
        return
    listen = None
    if args.listen:
        host, _, port = args.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidParameterError("listen", args.listen, "use HOST:PORT, e.g. 0.0.0.0:7400")
        listen = (host.strip("[]"), int(port))
    token = os.environ.get(agent_api.TOKEN_ENV) or agent_token()
    if listen and not token:
        raise InvalidParameterError(
            "listen",
            args.listen,
            "a TCP listener needs a token: set [modeldeploy] agent_token (or MODELDEPLOY_AGENT_TOKEN)",
        )
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s [agent pid=%(process)d] %(levelname)s %(message)s",
        force=True,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    state_dir, run_dir = config.agent_state_dir(), config.runtime_dir()
    interval = config.metrics_interval()  # read before Airflow's settings leave the environment
    # Airflow's settings and secrets are this process's, not the model servers'.
    for key in [k for k in os.environ if k.startswith(("AIRFLOW__", "_AIRFLOW")) or k == agent_api.TOKEN_ENV]:
        os.environ.pop(key)
    code = agent_api.serve(
        state_dir, run_dir, listen=listen, token=token, advertise_url=args.advertise_url, metrics_interval=interval
    )
    if code:
        sys.exit(code)


@cli_errors
def upgrade_registry(args: Any) -> None:
    from airflow_provider_modeldeploy.registry import get_registry
    from airflow_provider_modeldeploy.registry.store import safe_url

    registry = get_registry()
    before, after = registry.upgrade()
    what = "already at" if before == after else f"upgraded from {before or 'no tables'} to"
    print(f"served-models registry {safe_url(registry.url)}: {what} revision {after}", file=_out())
