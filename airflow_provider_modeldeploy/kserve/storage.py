"""What KServe downloads: MLflow URIs resolved to artifact locations, checked against what the chosen
runtime can load, and mapped to a URI the cluster's pods can read, all before anything is sent.

KServe's storage initializer takes ``s3://``, ``gs://``, ``pvc://``, ``http(s)://``, ``hf://``,
``oci://`` (never MLflow's ``models:/`` or ``runs:/``), and the runtimes load differently:

* KServe's sklearn server loads exactly one ``.joblib``/``.pkl``/``.pickle`` file at the top of the
  storage URI with joblib. MLflow 3 saves scikit-learn models as ``model.skops``, which it cannot
  load (``ModelMissingError`` on a cluster), so a joblib export of the model is written next to it
  (``<model>/kserve-sklearn/model.joblib``, once per model version) and that directory is served.
* MLServer's MLflow runtime loads the MLflow model directory itself (protocol v2 only).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from airflow_provider_modeldeploy.exceptions import InvalidParameterError
from airflow_provider_modeldeploy.kserve.manifests import JOBLIB_SUFFIXES, Runtime

log = logging.getLogger(__name__)
#: URI schemes KServe's storage initializer downloads from.
POD_SCHEMES = ("s3", "gs", "pvc", "http", "https", "hf", "oci")
EXPORT_DIR = "kserve-sklearn"


def resolve(model_uri: str, tracking_uri: str | None) -> tuple[str, str | None, str | None]:
    """(artifact location, registered version, run id) of an MLflow model URI; others as given."""
    if not model_uri.startswith(("models:/", "runs:/")):
        return model_uri, None, None
    import mlflow

    from airflow_provider_modeldeploy.serving import mlflow_server

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        served, version, run_id = mlflow_server.resolve_model_uri(model_uri)
    except mlflow_server._Failure as exc:
        raise InvalidParameterError("model_uri", model_uri, str(exc)) from None
    if served.startswith("models:/"):
        from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

        return ModelsArtifactRepository.get_underlying_uri(served), version, run_id
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    return RunsArtifactRepository.get_underlying_uri(served), version, run_id


def _top_files(location: str) -> list[str]:
    """Names of the files at the top of an artifact location (through MLflow's artifact repositories)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        entries = get_artifact_repository(location).list_artifacts()
    except Exception as exc:
        raise InvalidParameterError("model_uri", location, f"cannot be listed ({type(exc).__name__}: {exc})") from None
    return sorted(Path(e.path).name for e in entries if not e.is_dir)


def _flavors(location: str) -> list[str]:
    import yaml
    from mlflow.artifacts import download_artifacts

    with tempfile.TemporaryDirectory() as tmp:
        path = download_artifacts(artifact_uri=f"{location.rstrip('/')}/MLmodel", dst_path=tmp)
        return sorted((yaml.safe_load(Path(path).read_text()) or {}).get("flavors") or {})


def loadable_location(
    location: str, runtime: Runtime, model_uri: str, export_joblib: bool = True, write: bool = True
) -> str:
    """The artifact location ``runtime`` can load ``location``'s model from (a joblib export for the
    sklearn server, written when missing unless not ``write``); an error naming the files when it cannot."""
    files = _top_files(location)
    if runtime.loads == "mlflow":
        if "MLmodel" not in files:
            raise InvalidParameterError(
                "model_uri", model_uri,
                f"runtime {runtime.name} loads MLflow model directories, and {location} has no MLmodel file",
            )  # fmt: skip
        return location
    loadable = [f for f in files if f.endswith(JOBLIB_SUFFIXES)]
    if "MLmodel" not in files:
        if len(loadable) == 1:
            return location  # already what the sklearn server loads (e.g. an export, rolled back to)
        raise InvalidParameterError(
            "model_uri", model_uri,
            f"runtime {runtime.name} loads exactly one .joblib/.pkl/.pickle file, and {location} holds "
            f"{', '.join(loadable or files) or 'no file'}",
        )  # fmt: skip
    flavors = _flavors(location)
    if "sklearn" not in flavors:
        raise InvalidParameterError(
            "model_uri", model_uri,
            f"runtime {runtime.name} (KServe's sklearn server) serves scikit-learn models only, and this "
            f"MLflow model's flavors are {', '.join(flavors)}: use the connection's runtime 'mlserver'",
        )  # fmt: skip
    if not export_joblib:
        if len(loadable) == 1:
            return location
        raise InvalidParameterError(
            "model_uri", model_uri,
            f"runtime {runtime.name} loads exactly one .joblib/.pkl/.pickle file with joblib, and {location} "
            f"holds {', '.join(files)} (MLflow 3 saves scikit-learn models as model.skops): leave "
            "export_joblib on, or use the runtime 'mlserver'",
        )  # fmt: skip
    if not write:
        return f"{location.rstrip('/')}/{EXPORT_DIR}"  # what a deploy would write and serve
    return export_for_sklearn_server(location)


def export_for_sklearn_server(location: str) -> str:
    """``<location>/kserve-sklearn/model.joblib``: the MLflow model's estimator, dumped with joblib
    (written once; a later deployment of the same version finds it)."""
    target = f"{location.rstrip('/')}/{EXPORT_DIR}"
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(location)
    if any(Path(e.path).name == "model.joblib" for e in repo.list_artifacts(EXPORT_DIR)):
        return target
    import joblib
    import mlflow.sklearn

    with tempfile.TemporaryDirectory() as tmp:
        # Into a directory of ours: left to itself, MLflow copies a remote model into a new temporary
        # directory that nothing removes.
        estimator = mlflow.sklearn.load_model(location, dst_path=tmp)
        path = os.path.join(tmp, "model.joblib")
        joblib.dump(estimator, path)
        repo.log_artifact(path, EXPORT_DIR)
    log.info("Wrote a joblib export of %s for KServe's sklearn server at %s", location, target)
    return target


def pod_uri(location: str, local_map: dict[str, str], model_uri: str) -> str:
    """The storage URI pods read ``location`` under: as is for the schemes KServe downloads; a local
    path only through the connection's ``local_artifact_map``; anything else is an error."""
    scheme = urlsplit(location).scheme
    if scheme in POD_SCHEMES:
        return location
    if scheme in ("", "file"):
        path = urlsplit(location).path if scheme == "file" else location
        for prefix, target in sorted(local_map.items(), key=lambda kv: -len(kv[0])):
            if path.startswith(prefix):
                return target + path[len(prefix) :]
        raise InvalidParameterError(
            "model_uri", model_uri,
            f"its artifacts are at {location}, on this machine's disk, which the cluster's pods cannot "
            "read: give MLflow an S3, GCS or PVC artifact store (or map the path with the connection's "
            "local_artifact_map)",
        )  # fmt: skip
    raise InvalidParameterError(
        "model_uri", model_uri,
        f"its artifacts are at {location}, which KServe's storage initializer cannot download "
        f"({', '.join(s + '://' for s in POD_SCHEMES)}): use the tracking server's underlying artifact store",
    )  # fmt: skip
