"""The provider's metadata, read by Airflow's ProvidersManager through the entry point."""

from __future__ import annotations

from typing import Any

from airflow_provider_modeldeploy import __version__

_PKG = "airflow_provider_modeldeploy"


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-provider-modeldeploy",
        "name": "Model Deploy",
        "description": "Continuous training and deployment of ML models: tracked model servers "
        "(MLflow served locally, KServe or Seldon Core on Kubernetes) replaced in place.",
        "versions": [__version__],
        "integrations": [
            {"integration-name": "Model Deploy", "external-doc-url": "https://mlflow.org/", "tags": ["ml"]}
        ],
        "operators": [{"integration-name": "Model Deploy", "python-modules": [f"{_PKG}.operators.served_models"]}],
        "sensors": [{"integration-name": "Model Deploy", "python-modules": [f"{_PKG}.sensors.health"]}],
        "hooks": [
            {
                "integration-name": "Model Deploy",
                "python-modules": [f"{_PKG}.hooks.mlflow_local", f"{_PKG}.hooks.seldon", f"{_PKG}.hooks.kserve"],
            }
        ],
        "triggers": [
            {
                "integration-name": "Model Deploy",
                "python-modules": [f"{_PKG}.triggers.health", f"{_PKG}.triggers.alias_watcher"],
            }
        ],
        "connection-types": [
            {
                "hook-class-name": f"{_PKG}.hooks.mlflow_local.MlflowDeployerHook",
                "hook-name": "Model Deploy: MLflow (local model servers)",
                "connection-type": "modeldeploy_mlflow",
                "conn-fields": {
                    "tracking_uri": {
                        "label": "MLflow tracking URI",
                        "description": "Where models are looked up. Empty: MLflow's own default "
                        "(MLFLOW_TRACKING_URI, else sqlite under AIRFLOW_HOME).",
                        "schema": {"type": ["string", "null"]},
                    },
                    "registry_uri": {
                        "label": "MLflow model registry URI",
                        "description": "Empty: same as the tracking URI.",
                        "schema": {"type": ["string", "null"]},
                    },
                    "port_range": {
                        "label": "Port range",
                        "description": "Ports model servers may listen on, as FIRST-LAST.",
                        "schema": {"type": ["string", "null"], "default": "5200-5399"},
                    },
                    "workers": {
                        "label": "Workers per model server",
                        "schema": {"type": ["integer", "null"], "default": 1, "minimum": 1},
                    },
                    "timeout": {
                        "label": "Request timeout (seconds)",
                        "description": "MLflow scoring server per-request timeout.",
                        "schema": {"type": ["integer", "null"], "default": 60, "minimum": 1},
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "extra"],
                    "relabeling": {
                        "host": "Serving host (bind address)",
                        "login": "MLflow tracking username",
                        "password": "MLflow tracking password",
                    },
                    "placeholders": {
                        "host": "127.0.0.1",
                        "tracking_uri": "http://mlflow:5000",
                        "port_range": "5200-5399",
                    },
                },
            },
            {
                "hook-class-name": f"{_PKG}.hooks.seldon.SeldonDeployerHook",
                "hook-name": "Model Deploy: Seldon Core (Kubernetes)",
                "connection-type": "modeldeploy_seldon",
                "conn-fields": {
                    "kube_config_path": {
                        "label": "Kube config path",
                        "description": "As the Kubernetes connection understands it; empty: in_cluster, "
                        "kube_config or the default kubeconfig.",
                        "schema": {"type": ["string", "null"]},
                    },
                    "kube_config": {
                        "label": "Kube config (JSON format)",
                        "schema": {"type": ["string", "null"]},
                    },
                    "cluster_context": {"label": "Cluster context", "schema": {"type": ["string", "null"]}},
                    "in_cluster": {
                        "label": "In cluster configuration",
                        "schema": {"type": ["boolean", "null"], "default": False},
                    },
                    "namespace": {
                        "label": "Namespace",
                        "description": "Where SeldonDeployments are created.",
                        "schema": {"type": ["string", "null"], "default": "default"},
                    },
                    "ingress_base_url": {
                        "label": "Ingress base URL",
                        "description": "Where /seldon/<namespace>/<name>/... answers (Istio or Ambassador).",
                        "schema": {"type": ["string", "null"]},
                    },
                    "storage_secret": {
                        "label": "Storage credentials Secret",
                        "description": "Name of the Secret with the model storage credentials (envSecretRefName).",
                        "schema": {"type": ["string", "null"]},
                    },
                    "storage_conn_id": {
                        "label": "Storage connection id",
                        "description": "An S3/MinIO connection to create the storage Secret from when it is missing.",
                        "schema": {"type": ["string", "null"]},
                    },
                    "implementation": {
                        "label": "Default implementation",
                        "schema": {"type": ["string", "null"], "default": "MLFLOW_SERVER"},
                    },
                    "protocol": {
                        "label": "Protocol",
                        "description": "seldon or v2.",
                        "schema": {"type": ["string", "null"], "default": "seldon"},
                    },
                    "replicas": {
                        "label": "Default replicas",
                        "schema": {"type": ["integer", "null"], "default": 1, "minimum": 1},
                    },
                    "tracking_uri": {
                        "label": "MLflow tracking URI",
                        "description": "To resolve models:/ URIs into the storage URIs Seldon downloads.",
                        "schema": {"type": ["string", "null"]},
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["host", "schema", "port", "login", "password", "extra"],
                    "relabeling": {},
                    "placeholders": {
                        "namespace": "seldon",
                        "ingress_base_url": "http://istio-ingressgateway.istio-system",
                        "implementation": "MLFLOW_SERVER",
                    },
                },
            },
            {
                "hook-class-name": f"{_PKG}.hooks.kserve.KServeDeployerHook",
                "hook-name": "Model Deploy: KServe (Kubernetes)",
                "connection-type": "modeldeploy_kserve",
                "conn-fields": {
                    "kube_config_path": {
                        "label": "Kube config path",
                        "description": "As the Kubernetes connection understands it; empty: in_cluster, "
                        "kube_config or the default kubeconfig.",
                        "schema": {"type": ["string", "null"]},
                    },
                    "kube_config": {
                        "label": "Kube config (JSON format)",
                        "description": "A whole kubeconfig; it holds credentials, so it is a password field.",
                        "schema": {"type": ["string", "null"], "format": "password"},
                    },
                    "cluster_context": {"label": "Cluster context", "schema": {"type": ["string", "null"]}},
                    "in_cluster": {
                        "label": "In cluster configuration",
                        "schema": {"type": ["boolean", "null"], "default": False},
                    },
                    "namespace": {
                        "label": "Namespace",
                        "description": "Where InferenceServices are created.",
                        "schema": {"type": ["string", "null"], "default": "default"},
                    },
                    "deployment_mode": {
                        "label": "Deployment mode",
                        "schema": {
                            "type": ["string", "null"],
                            "enum": ["Standard", "Knative", None],
                            "default": "Standard",
                        },
                    },
                    "protocol": {
                        "label": "Protocol",
                        "description": "v1 or v2 (Open Inference Protocol). Empty: the runtime's first "
                        "(sklearn: v1, mlserver: v2).",
                        "schema": {"type": ["string", "null"], "enum": ["v1", "v2", None]},
                    },
                    "runtime": {
                        "label": "Runtime",
                        "description": "sklearn: KServe's sklearn server, fed a joblib export written next to "
                        "the MLflow model; mlserver: MLServer loading the MLflow model directory (v2 only).",
                        "schema": {
                            "type": ["string", "null"],
                            "enum": ["sklearn", "mlserver", None],
                            "default": "sklearn",
                        },
                    },
                    "serving_runtime": {
                        "label": "ServingRuntime name",
                        "description": "Use this (Cluster)ServingRuntime instead of the runtime's default one.",
                        "schema": {"type": ["string", "null"]},
                    },
                    "url_template": {
                        "label": "Ingress / URL override",
                        "description": "The endpoint's base URL when status.url is not reachable from Airflow, "
                        "with {namespace} and {name}.",
                        "schema": {"type": ["string", "null"]},
                    },
                    "service_account": {
                        "label": "Service account",
                        "description": "Of the predictor pods (with storage credentials attached).",
                        "schema": {"type": ["string", "null"]},
                    },
                    "storage_conn_id": {
                        "label": "Storage connection id",
                        "description": "An S3/MinIO connection; its keys go into a Secret of ours, attached "
                        "through a ServiceAccount of ours.",
                        "schema": {"type": ["string", "null"]},
                    },
                    "storage_secret": {
                        "label": "Storage credentials Secret",
                        "schema": {"type": ["string", "null"], "default": "modeldeploy-storage"},
                    },
                    "replicas": {
                        "label": "Min replicas",
                        "schema": {"type": ["integer", "null"], "default": 1, "minimum": 0},
                    },
                    "max_replicas": {"label": "Max replicas", "schema": {"type": ["integer", "null"], "minimum": 1}},
                    "tracking_uri": {
                        "label": "MLflow tracking URI",
                        "description": "To resolve models:/ and runs:/ URIs into the storage URIs KServe downloads.",
                        "schema": {"type": ["string", "null"]},
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["host", "schema", "port", "login", "password"],
                    "relabeling": {},
                    "placeholders": {
                        "namespace": "models",
                        "url_template": "http://istio-ingressgateway.istio-system/serving/{namespace}/{name}",
                        "extra": '{"resources": {"requests": {"cpu": "1"}}, "local_artifact_map": {}}',
                    },
                },
            },
        ],
        "cli": [f"{_PKG}.cli.definition.get_served_models_cli_commands"],
        "config": {
            "modeldeploy": {
                "description": "Settings of the model deployment provider.",
                "options": {
                    "registry_sql_alchemy_conn": {
                        "description": "SQLAlchemy URL of the served-models registry. Empty: a SQLite "
                        "file at {AIRFLOW_HOME}/modeldeploy/registry.db. Use PostgreSQL when workers, "
                        "the API server and the CLI run on several machines.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "postgresql+psycopg2://airflow:airflow@postgres/modeldeploy",
                        "default": "",
                        "sensitive": True,
                    },
                    "registry_auto_upgrade": {
                        "description": "Whether first use of a shared (non-SQLite) registry creates or "
                        "upgrades its tables. False: run 'airflow served-models db-upgrade' as a deployment "
                        "step (as 'airflow db migrate'); no API server request or task ever migrates it. "
                        "The SQLite default always upgrades itself.",
                        "version_added": "0.2.0",
                        "type": "boolean",
                        "example": "True",
                        "default": "False",
                    },
                    "state_dir": {
                        "description": "Directory for model server logs and state. Empty: {AIRFLOW_HOME}/modeldeploy.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "/var/lib/modeldeploy",
                        "default": "",
                    },
                    "default_conn_id": {
                        "description": "Connection used when an operator or command names none. When "
                        "it is not defined, a local MLflow deployer with default settings is used.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "modeldeploy_default",
                        "default": "modeldeploy_default",
                    },
                    "ui_max_concurrent_actions": {
                        "description": "How many start / stop / rollback / delete actions asked from the "
                        "Served Models page run at once in each API server process, in threads of their own "
                        "(never the API server's shared ones). An action not finished within its 'wait' "
                        "seconds is answered 202 with a status URL to poll; more than four times this many "
                        "actions under way are refused with 429.",
                        "version_added": "0.2.0",
                        "type": "integer",
                        "example": "8",
                        "default": "4",
                    },
                    "agent_idle_timeout": {
                        "description": "Seconds the serving agent started on first use (the local MLflow "
                        "backend's supervisor of this host's model servers, which forks them from an "
                        "interpreter with MLflow, scikit-learn and pandas imported) lives once it supervises "
                        "no server and gets no request. 0: it never exits. An agent run with "
                        "'airflow served-models agent' never exits on its own.",
                        "version_added": "0.2.0",
                        "type": "float",
                        "example": "0",
                        "default": "600",
                    },
                    "metrics_interval": {
                        "description": "Seconds between two readings of each local model server's /metrics "
                        "by the serving agent, which keeps per-minute figures for 25 hours (the Served Models "
                        "page's charts and 'airflow served-models describe').",
                        "version_added": "0.3.0",
                        "type": "float",
                        "example": "5",
                        "default": "15",
                    },
                    "agent_url": {
                        "description": "The serving agent that runs local MLflow model servers when a "
                        "connection names none: http://HOST:PORT of an agent run with 'airflow "
                        "served-models agent --listen'. Empty: this host's own agent, started on first use.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "http://model-serving:7400",
                        "default": "",
                    },
                    "agent_token": {
                        "description": "Shared token of serving agents' TCP listeners (sent as a Bearer "
                        "token; an agent refuses requests without it). Also a connection's agent_token extra.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": None,
                        "default": "",
                        "sensitive": True,
                    },
                    "runtime_dir": {
                        "description": "Private directory (0700, owned by the user) for the serving "
                        "agent's and the model servers' unix sockets. Empty: $XDG_RUNTIME_DIR or /tmp, "
                        "then modeldeploy-<uid>. A directory that is not private is refused.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "/run/modeldeploy",
                        "default": "",
                    },
                    "agent_state_dir": {
                        "description": "The serving agent's records (pid and start time of each server) and "
                        "server logs. Empty: {state_dir}/agent.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "/var/lib/modeldeploy/agent",
                        "default": "",
                    },
                },
            }
        },
    }
