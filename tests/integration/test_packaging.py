"""The tests run against the installed wheel, and the wheel holds every file the package reads."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from conftest import ROOT

import airflow_provider_modeldeploy

SOURCE = ROOT / "airflow_provider_modeldeploy"


def installed_files() -> set[str]:
    files = importlib.metadata.distribution("airflow-provider-modeldeploy").files or []
    return {str(f) for f in files}


def test_the_package_is_imported_from_the_installed_wheel() -> None:
    where = Path(airflow_provider_modeldeploy.__file__).resolve()
    assert not where.is_relative_to(SOURCE), f"imported from the checkout ({where}), not the installed wheel"
    assert "site-packages" in where.parts
    direct_url = importlib.metadata.distribution("airflow-provider-modeldeploy").read_text("direct_url.json")
    assert not json.loads(direct_url or "{}").get("dir_info", {}).get("editable"), direct_url


def test_every_file_of_the_source_tree_is_in_the_wheel() -> None:
    """Data files (CRD schema, templates, migrations) are read at run time: each must ship."""
    wanted = {
        str(path.relative_to(ROOT))
        for path in SOURCE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc",)
    }
    missing = sorted(wanted - installed_files())
    assert not missing, f"in the source tree but not in the installed wheel: {missing}"


def test_the_files_the_code_opens_exist_where_it_opens_them() -> None:
    from airflow_provider_modeldeploy.kserve import manifests as kserve_manifests
    from airflow_provider_modeldeploy.plugins import app
    from airflow_provider_modeldeploy.registry import store
    from airflow_provider_modeldeploy.seldon import manifests

    assert manifests.CRD_PATH.is_file() and "openAPIV3Schema" in manifests.CRD_PATH.read_text()
    assert kserve_manifests.CRD_PATH.is_file() and kserve_manifests.crd_schema()["properties"]["spec"]
    installed = Path(airflow_provider_modeldeploy.__file__).parent
    assert (installed / "plugins" / "templates" / "served_models.html").is_file(), app.__file__
    versions = sorted(p.name for p in (installed / "registry" / "migrations" / "versions").glob("*.py"))
    assert versions[-1].startswith(store.HEAD_REVISION), versions
