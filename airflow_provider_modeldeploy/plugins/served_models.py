"""The plugin Airflow's API server loads: mounts the view's FastAPI app and adds the navigation entry.

Only FastAPI and the provider's light modules are imported here: the API server imports plugins when
it starts, so MLflow and the deployers are imported by the endpoints that need them.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airflow_provider_modeldeploy.plugins.app import URL_PREFIX, create_app


class ServedModelsPlugin(AirflowPlugin):
    """Adds "Served Models" to the Airflow 3 navigation, backed by the served-models registry."""

    name = "modeldeploy_served_models"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Served Models"}]
    # With url_route the UI shows the page inside its own frame at /plugin/served-models; the page
    # authenticates with the UI's session cookie, which the frame sends (same origin).
    external_views = [
        {
            "name": "Served Models",
            "href": f"{URL_PREFIX}/",
            "destination": "nav",
            "url_route": "served-models",
            # Top level of the navigation bar, not folded into a "Plugins" menu.
            "nav_top_level": True,
        }
    ]
