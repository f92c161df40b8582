"""pytest plugin, loaded for every run (pyproject.toml: ``addopts = "-p installed_wheel"``, ``pythonpath``):
the tests are of the installed wheel (scripts/test.sh builds and installs it), unit and integration alike.

Stops the run at once if the package would come from this checkout, here or in any Python process the tests
start. A plugin rather than a conftest.py: ``tests/integration/conftest.py`` is imported as the module
``conftest`` (its tests ``from conftest import ...``), and a second top-level conftest would collide with it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    import airflow_provider_modeldeploy

    where = Path(airflow_provider_modeldeploy.__file__).resolve()
    if where.is_relative_to(ROOT / "airflow_provider_modeldeploy"):
        pytest.exit(f"airflow_provider_modeldeploy is imported from the checkout ({where}); run scripts/test.sh", 2)
    os.environ["PYTHONSAFEPATH"] = "1"  # no `python -c` started in ROOT imports the checkout either
