"""Declares ``airflow served-models``; Airflow loads it through the provider info's ``cli`` entry."""

from __future__ import annotations

from airflow.cli.cli_config import (
    ARG_OUTPUT,
    ARG_VERBOSE,
    ARG_YES,
    ActionCommand,
    Arg,
    GroupCommand,
    lazy_load_command,
    positive_int,
)

_non_negative_int = positive_int(allow_zero=True)


def _positive_float(value: str) -> float:
    import argparse

    try:
        number = float(value)
    except ValueError:
        number = -1
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of seconds")
    return number


_COMMANDS = "airflow_provider_modeldeploy.cli.commands."
ARG_UUID = Arg(("uuid",), help="Service uuid (a unique prefix of at least 4 characters is enough)")
ARG_MODEL = Arg(("--model",), help="Only services of this model name")
ARG_DAG_ID = Arg(("--dag-id",), help="Only services deployed by this DAG")
ARG_TASK_ID = Arg(("--task-id",), help="Only services deployed by this task")
ARG_RUNNING = Arg(("--running",), help="Only services that are running", action="store_true")
ARG_LIMIT = Arg(("--limit",), help="At most this many services (default 100)", type=_non_negative_int, default=100)
ARG_OFFSET = Arg(("--offset",), help="Skip this many services first", type=_non_negative_int, default=0)
ARG_TIMEOUT = Arg(("--timeout",), help="Seconds to wait (default 300)", type=_positive_float, default=300.0)
ARG_FORCE = Arg(("--force",), help="Kill at once instead of draining in-flight requests", action="store_true")
ARG_TAIL = Arg(("--tail",), help="Only the last N lines", type=_non_negative_int, default=None)
ARG_FOLLOW = Arg(
    ("-f", "--follow"),
    help="Keep printing new lines while the server runs, until it stops or Ctrl-C (exit code 0)",
    action="store_true",
)
ARG_CONN_ID = Arg(
    ("--conn-id",),
    help="Also reconcile this deployer connection (default: the connections the registry names, and the default one)",
    action="append",
    dest="conn_ids",
)
ARG_ROLLBACK_TO = Arg(
    ("--to",), dest="to", help="The earlier service (uuid from the endpoint's history) to serve again", default=None
)
ARG_HISTORY = Arg(
    ("--history",), help="Events of the endpoint to show (default 10)", type=_non_negative_int, default=10
)
ARG_DRY_RUN = Arg(
    ("--dry-run",), help="Only show what would change (adopted, lost, removed); change nothing", action="store_true"
)
ARG_LISTEN = Arg(
    ("--listen",),
    help="Also listen on HOST:PORT (TCP) so that other hosts can act; needs [modeldeploy] agent_token",
    default=None,
)
ARG_ADVERTISE = Arg(
    ("--advertise-url",),
    help="The URL other hosts reach this agent at (default http://HOST:PORT of --listen); kept in the registry",
    default=None,
)
ARG_CHECK = Arg(
    ("--check",),
    help="Do not run an agent: exit 0 if this host's agent answers (a container health check), else 1",
    action="store_true",
)

ARG_MODEL_URI = Arg(("model_uri",), help="MLflow model URI (models:/name/3, models:/name@alias, runs:/...)")
ARG_MODEL_NAME = Arg(("--model-name",), help="The model's name (also the endpoint's, unless --endpoint)", required=True)
ARG_ENDPOINT = Arg(("--endpoint",), help="The endpoint (default: the model name)", default=None)
ARG_DEPLOY_CONN = Arg(("--conn-id",), dest="deploy_conn_id", help="The deployer connection (default: the default one)")
ARG_OPTION = Arg(
    ("--option",), dest="options", action="append", metavar="KEY=VALUE",
    help="A backend option, as a deploy's backend_options has it (VALUE is JSON, else a string); repeatable",
)  # fmt: skip
ARG_FORMAT = Arg(("--format",), help="yaml (default) or json", choices=("yaml", "json"), default="yaml")

SERVED_MODELS_COMMANDS = (
    ActionCommand(
        name="list",
        help="List served models",
        func=lazy_load_command(_COMMANDS + "list_services"),
        args=(ARG_MODEL, ARG_DAG_ID, ARG_TASK_ID, ARG_RUNNING, ARG_LIMIT, ARG_OFFSET, ARG_OUTPUT, ARG_VERBOSE),
    ),
    ActionCommand(
        name="describe",
        help="Show every property of a served model and its endpoint's history",
        func=lazy_load_command(_COMMANDS + "describe_service"),
        args=(ARG_UUID, ARG_HISTORY, ARG_OUTPUT, ARG_VERBOSE),
    ),
    ActionCommand(
        name="get-url",
        help="Print the prediction URL of a running served model",
        func=lazy_load_command(_COMMANDS + "get_url"),
        args=(ARG_UUID, ARG_VERBOSE),
    ),
    ActionCommand(
        name="logs",
        help="Print the log of a served model's server",
        func=lazy_load_command(_COMMANDS + "show_logs"),
        args=(ARG_UUID, ARG_TAIL, ARG_FOLLOW, ARG_VERBOSE),
    ),
    ActionCommand(
        name="start",
        help="Start a stopped served model at its endpoint's URL",
        func=lazy_load_command(_COMMANDS + "start_service"),
        args=(ARG_UUID, ARG_TIMEOUT, ARG_OUTPUT, ARG_VERBOSE),
    ),
    ActionCommand(
        name="stop",
        help="Stop a served model (it can be started again)",
        func=lazy_load_command(_COMMANDS + "stop_service"),
        args=(ARG_UUID, ARG_TIMEOUT, ARG_FORCE, ARG_OUTPUT, ARG_VERBOSE),
    ),
    ActionCommand(
        name="delete",
        help="Stop a served model and remove it from the registry",
        func=lazy_load_command(_COMMANDS + "delete_service"),
        args=(ARG_UUID, ARG_YES, ARG_TIMEOUT, ARG_FORCE, ARG_VERBOSE),
    ),
    ActionCommand(
        name="promote",
        help="Give a canary all of its endpoint's traffic",
        func=lazy_load_command(_COMMANDS + "promote_service"),
        args=(ARG_UUID, ARG_TIMEOUT, ARG_OUTPUT, ARG_VERBOSE),
    ),
    ActionCommand(
        name="rollback",
        help="Serve an earlier version of the endpoint again (a canary in progress is removed)",
        func=lazy_load_command(_COMMANDS + "rollback_service"),
        args=(ARG_UUID, ARG_ROLLBACK_TO, ARG_TIMEOUT, ARG_OUTPUT, ARG_VERBOSE),
    ),
    ActionCommand(
        name="render",
        help="Print the manifest a deploy would send (validated against the CRD), sending nothing",
        func=lazy_load_command(_COMMANDS + "render_manifest"),
        args=(ARG_MODEL_URI, ARG_MODEL_NAME, ARG_ENDPOINT, ARG_DEPLOY_CONN, ARG_OPTION, ARG_FORMAT, ARG_VERBOSE),
    ),
    ActionCommand(
        name="sync",
        help="Reconcile the registry with what the backends run: adopt unknown servers, mark lost ones",
        func=lazy_load_command(_COMMANDS + "sync_services"),
        args=(ARG_CONN_ID, ARG_DRY_RUN, ARG_OUTPUT, ARG_VERBOSE),
    ),
    ActionCommand(
        name="db-upgrade",
        help="Create or upgrade the served-models registry's tables (a deployment step for a shared database)",
        func=lazy_load_command(_COMMANDS + "upgrade_registry"),
        args=(ARG_VERBOSE,),
    ),
    ActionCommand(
        name="agent",
        help="Run this host's serving agent in the foreground (for compose, systemd or a container)",
        func=lazy_load_command(_COMMANDS + "run_agent"),
        args=(ARG_LISTEN, ARG_ADVERTISE, ARG_CHECK, ARG_VERBOSE),
    ),
)


def get_served_models_cli_commands() -> list[GroupCommand]:
    return [
        GroupCommand(
            name="served-models",
            help="See and act on served models (model servers deployed by DAGs)",
            subcommands=SERVED_MODELS_COMMANDS,
        )
    ]
