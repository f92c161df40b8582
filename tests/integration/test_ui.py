"""The "Served Models" view, end to end: a real ``airflow api-server`` (SimpleAuthManager, admin + viewer)
loading the provider's plugin, a registry holding a real MLflow model server and rows in every state
(and a Seldon one), headless Debian Chromium driven by Playwright, and schemathesis on the JSON API.

One api-server for the module; tests run in file order, and the fuzzing comes last.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import run_airflow
from local_http import HTTP
from ui_helpers import ApiServer, running_api_server, seed_rows, ui_environment

from airflow_provider_modeldeploy.registry.store import HOSTNAME

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SECRET = "s3cr3t-do-not-show"
BULK = 60
#: A Seldon connection without ``prometheus_url``: its services' metrics are unavailable, with the reason.
SELDON_CONN = "seldon_ui"
SELDON_CONN_JSON = json.dumps(
    {"conn_type": "modeldeploy_seldon", "extra": {"namespace": "models", "kube_config_path": "/nonexistent/kubeconfig"}}
)


@pytest.fixture(scope="module")
def ui(
    tmp_path_factory: pytest.TempPathFactory, mlflow_models: dict[str, Any], airflow_db_template: Path
) -> Iterator[dict[str, Any]]:
    """The api-server, the registry it reads, and the seeded services."""
    from airflow_provider_modeldeploy.deployers import get_model_deployer
    from airflow_provider_modeldeploy.registry import get_registry
    from airflow_provider_modeldeploy.services import Lineage, ServiceConfig, ServiceRecord, ServiceState

    base = tmp_path_factory.mktemp("ui")
    home = base / "airflow"
    url = f"sqlite:///{home / 'modeldeploy' / 'registry.db'}"
    env = {f"AIRFLOW_CONN_{SELDON_CONN.upper()}": SELDON_CONN_JSON}
    with (
        ui_environment(home, url, _MODELDEPLOY_NO_METASTORE="1"),
        running_api_server(home, template=airflow_db_template, **env) as server,
    ):
        registry = get_registry(url)
        deployer = get_model_deployer()
        real = deployer.deploy_model(
            ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris", endpoint="iris-ui"),
            lineage=Lineage(dag_id="iris_ct", run_id="manual__ui", task_id="deploy", try_number=1),
        )
        failed = registry.add_service(
            ServiceRecord(
                uuid="e" * 8 + "-0000-4000-8000-000000000001", backend="mlflow", endpoint="broken-ui",
                model_name="broken", model_uri="models:/broken/1", model_version="1", state=ServiceState.ERROR,
                last_error="model weights are corrupted", dag_id="broken_ct", run_id="manual__b", task_id="deploy",
                config={"api_token": SECRET, "workers": 1},
            )
        )  # fmt: skip
        seldon = registry.add_service(
            ServiceRecord(
                uuid="5e1d0000-0000-4000-8000-000000000002", backend="seldon", endpoint="iris-seldon",
                model_name="iris", model_uri="models:/iris/2", model_version="2", state=ServiceState.INACTIVE,
                prediction_url="http://seldon.example/seldon/ns/iris-seldon/api/v1.0/predictions",
            )
        )  # fmt: skip
        bulk = seed_rows(registry, BULK)
        yield {
            "server": server, "registry": registry, "url": url, "home": home, "artefacts": base,
            "real": real.uuid, "failed": failed.uuid, "seldon": seldon.uuid, "bulk": bulk,
        }  # fmt: skip
        for service in registry.find_services(backend="mlflow"):
            if service.pid or service.state == ServiceState.ACTIVE:
                deployer.delete_model_server(service.uuid, timeout=10, force=True)


def _call(client: httpx.Client, method: str, path: str) -> httpx.Response:
    body = None if method in ("GET", "DELETE") else {}
    return client.request(method, path, json=body)


ROUTES = [
    ("GET", "/"),
    ("GET", "/services/{uuid}"),
    ("GET", "/api/openapi.json"),
    ("GET", "/api/services"),
    ("GET", "/api/services/{uuid}"),
    ("GET", "/api/services/{uuid}/logs"),
    ("GET", "/api/services/{uuid}/health"),
    ("POST", "/api/services/{uuid}/start"),
    ("POST", "/api/services/{uuid}/stop"),
    ("POST", "/api/services/{uuid}/rollback"),
    ("DELETE", "/api/services/{uuid}"),
]


def test_every_route_needs_an_airflow_user(ui: dict[str, Any]) -> None:
    server: ApiServer = ui["server"]
    with server.client(None) as anonymous:
        for method, path in ROUTES:
            resp = _call(anonymous, method, path.format(uuid=ui["real"]))
            assert resp.status_code == 401, (method, path, resp.status_code, resp.text)
        # A browser that is signed out gets a sentence, not JSON.
        page = anonymous.get("/", headers={"Accept": "text/html"})
        assert page.status_code == 401 and "sign in" in page.text.lower()
        # ... and a way in: Airflow's login, which brings the browser back to this page (the browser test signs in).
        assert 'href="/api/v2/auth/login?next=%2Fserved-models%2F"' in page.text, page.text
    # A forged cookie is not a session.
    with httpx.Client(base_url=f"{server.url}/served-models", cookies={"_token": "forged"}) as forged:
        assert forged.get("/api/services").status_code in (401, 403)
    # The real server is untouched.
    assert ui["registry"].get_service(ui["real"]).state == "active"


def test_viewer_reads_but_may_not_act(ui: dict[str, Any]) -> None:
    server: ApiServer = ui["server"]
    with server.client("viewer") as viewer:
        page = viewer.get("/api/services")
        assert page.status_code == 200 and page.json()["can_act"] is False
        assert viewer.get(f"/api/services/{ui['real']}").json()["can_act"] is False
        for method, path in ROUTES:
            if method == "GET":
                assert _call(viewer, method, path.format(uuid=ui["real"])).status_code == 200, path
            else:
                resp = _call(viewer, method, path.format(uuid=ui["real"]))
                assert resp.status_code == 403, (method, path, resp.text)
                assert "viewer may not change" in resp.json()["detail"]
    # State-changing routes are not GETs.
    with server.client("admin") as admin:
        assert admin.get(f"/api/services/{ui['real']}/stop").status_code == 405
        # A cross-site form can only send text/plain or form bodies: actions take JSON only.
        for content_type in ("text/plain", "application/x-www-form-urlencoded"):
            resp = admin.post(f"/api/services/{ui['real']}/stop", content=b"{}", headers={"Content-Type": content_type})
            assert resp.status_code == 422, (content_type, resp.text)
    assert ui["registry"].get_service(ui["real"]).state == "active"


def test_list_api_filters_sorts_and_pages(ui: dict[str, Any]) -> None:
    with ui["server"].client("admin") as admin:
        everything = admin.get("/api/services", params={"limit": 500}).json()
        assert everything["total"] == BULK + 3 and len(everything["services"]) == BULK + 3
        by_uuid = {s["uuid"]: s for s in everything["services"]}
        assert by_uuid[ui["real"]]["status_label"] == "Running" and by_uuid[ui["real"]]["prediction_url"]
        assert by_uuid[ui["failed"]]["status_label"] == "Failed"
        assert by_uuid[ui["seldon"]]["backend"] == "seldon"
        assert by_uuid[ui["real"]]["links"]["task_instance"] == "/dags/iris_ct/runs/manual__ui/tasks/deploy"

        failed = admin.get("/api/services", params={"state": "error"}).json()
        assert [s["uuid"] for s in failed["services"]] == [ui["failed"]] and failed["total"] == 1
        iris = admin.get("/api/services", params={"model": "IRIS"}).json()
        assert {s["uuid"] for s in iris["services"]} == {ui["real"], ui["seldon"]}
        dag = admin.get("/api/services", params={"dag_id": "bulk_dag_3", "limit": 500}).json()
        assert dag["total"] == BULK // 20 and all(s["dag_id"] == "bulk_dag_3" for s in dag["services"])

        names = [s["model_name"] for s in admin.get("/api/services", params={"sort": "model_name", "order": "asc", "limit": 500}).json()["services"]]  # fmt: skip
        assert names == sorted(names)
        pages = [admin.get("/api/services", params={"limit": 25, "offset": o}).json() for o in (0, 25, 50)]
        seen = [s["uuid"] for p in pages for s in p["services"]]
        assert len(seen) == len(set(seen)) == BULK + 3 and [len(p["services"]) for p in pages] == [25, 25, 13]

        # Bad input: one clear error naming the field and the value, never a traceback.
        for params, field in (({"limit": 0}, "limit"), ({"sort": "password"}, "sort"), ({"state": "sleepy"}, "state")):
            resp = admin.get("/api/services", params=params)
            assert resp.status_code == 422, resp.text
            assert field in json.dumps(resp.json()["detail"]) and "Traceback" not in resp.text
        missing = admin.get("/api/services/abcdef12")
        assert missing.status_code == 404 and "abcdef12" in missing.json()["detail"]
        page = admin.get("/services/abcdef12", headers={"Accept": "text/html"})
        assert page.status_code == 404 and "abcdef12" in page.text and page.text.startswith("<!doctype html>")


def test_detail_api_shows_lineage_history_logs_health_and_no_secret(ui: dict[str, Any]) -> None:
    server: ApiServer = ui["server"]
    with server.client("admin") as admin:
        detail = admin.get(f"/api/services/{ui['real']}").json()
        assert detail["service"]["model_uri"] == "models:/iris/1" and detail["service"]["model_version"] == "1"
        assert (
            detail["lineage"]["airflow"]["dag_id"] == "iris_ct" and detail["lineage"]["mlflow"]["model_version"] == "1"
        )
        assert [e["action"] for e in detail["history"]][-1] == "deploy"
        # The XCom lookup ran against Airflow's metadata DB (this run pushed none), it did not fail.
        assert detail["lineage"]["airflow"]["xcom"] == []
        logs = admin.get(f"/api/services/{ui['real']}/logs", params={"tail": 20}).json()
        assert 0 < len(logs["lines"]) <= 20
        health = admin.get(f"/api/services/{ui['real']}/health").json()
        assert health["healthy"] is True, health
        assert admin.get(f"/api/services/{ui['failed']}/health").json()["healthy"] is False
        texts = [
            admin.get(f"/api/services/{ui['failed']}").text,
            admin.get("/api/services", params={"limit": 500}).text,
            admin.get("/").text,
        ]
    for text in texts:
        assert SECRET not in text
        for password in server.passwords.values():
            assert password not in text
        assert server.token("admin") not in text
    assert '"api_token": "***"' in texts[0].replace('":"', '": "')


# -- the browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(ui: dict[str, Any]) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is needed: apt-get install -y chromium chromium-driver"
    with sync_playwright() as p:
        # Debian's chromium, never a downloaded one (`playwright install` is not used).
        instance = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


def _page_as(browser: Any, server: ApiServer, user: str) -> Any:
    """A browser page signed in the way the UI is: the JWT in Airflow's ``_token`` session cookie."""
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    context.add_cookies([{"name": "_token", "value": server.token(user), "url": server.url}])
    page = context.new_page()
    page.set_default_timeout(60_000)
    return page


def _signed_in(browser: Any, server: ApiServer, user: str, path: str = "/") -> Any:
    """A browser page signed in as a person does: at ``path``, signed out, Airflow's UI sends the browser to
    SimpleAuthManager's login page (the Served Models page links to it), whose form (user name and
    password) gets the session cookie and goes back to ``path``."""
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{server.url}{path}")
    if path.startswith("/served-models"):
        page.get_by_role("link", name="Sign in").click()  # the page's own way in, as a signed-out person sees it
    page.wait_for_url(re.compile(r".*/auth/login\?next=.*"))
    page.locator("input[name=username]").fill(user)
    page.locator("input[name=password]").fill(server.passwords[user])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: urlsplit(url).path == path)  # back where the browser was sent from
    assert [c["name"] for c in context.cookies() if c["name"] == "_token"] == ["_token"]
    return page


def _row(page: Any, uuid: str) -> Any:
    return page.locator(f'tr[data-uuid="{uuid}"]')


def _cli_services(ui: dict[str, Any], dag_id: str) -> dict[str, dict[str, Any]]:
    done = run_airflow(ui["home"], "served-models", "list", "--dag-id", dag_id, "--output", "json", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return {s["uuid"]: s for s in json.loads(done.stdout[done.stdout.index("[") :])}


def test_browser_list_detail_and_actions(ui: dict[str, Any], browser: Any) -> None:
    server: ApiServer = ui["server"]
    shots = ui["artefacts"] / "screenshots"
    shots.mkdir(exist_ok=True)
    # Signed in through Airflow's login page, then the navigation of Airflow's own UI offers the view.
    page = _signed_in(browser, server, "admin")
    page.get_by_text("Served Models").first.click()
    # Inside the UI, the page runs in Airflow's frame and signs in with the UI's session cookie.
    page.wait_for_url(re.compile(r".*/plugin/served-models"))
    page.frame_locator("iframe").locator("#range").filter(has_text="of 63").wait_for()

    page.goto(f"{server.url}/served-models/")
    page.locator("#range").filter(has_text="of 63").wait_for()
    assert _row(page, ui["real"]).locator(".state").inner_text() == "Running"
    assert _row(page, ui["failed"]).locator(".state").inner_text() == "Failed"
    assert "model weights are corrupted" in _row(page, ui["failed"]).inner_text()
    assert _row(page, ui["seldon"]).locator(".backend").inner_text() == "seldon"
    assert page.locator("tbody tr").count() == 25
    page.screenshot(path=str(shots / "list.png"), full_page=True)

    # Paging and filters.
    page.click("#next")
    page.locator("#range").filter(has_text="26-50 of 63").wait_for()
    page.select_option("#f-state", "error")
    page.click("#apply")
    page.locator("#range").filter(has_text="1-1 of 1").wait_for()
    assert page.locator("tbody tr").count() == 1 and _row(page, ui["failed"]).count() == 1
    page.select_option("#f-state", "")
    page.fill("#f-dag", "iris_ct")
    page.click("#apply")
    # The range reads "1-1 of 1" before and after: wait for the row the new filter brings.
    _row(page, ui["real"]).wait_for()
    assert page.locator("tbody tr").count() == 1 and page.locator("#range").inner_text() == "1-1 of 1"
    page.fill("#f-dag", "")
    page.fill("#f-model", "iris")
    page.click("#apply")
    page.locator("#range").filter(has_text="1-2 of 2").wait_for()

    # The detail page: properties, lineage, history, log, live health.
    page.goto(f"{server.url}/served-models/services/{ui['real']}")
    page.locator("#health").filter(has_text="Healthy").wait_for()
    assert page.locator('[data-prop="model_uri"]').inner_text() == "models:/iris/1"
    # The log comes from the serving agent in a request of its own: wait for it, as a person would.
    page.wait_for_function("document.querySelector('#logs').textContent.trim() !== 'loading…'")
    assert page.locator("#logs").inner_text().strip() not in ("", "loading…")
    assert "accepting on" in page.locator("#logs").inner_text()
    assert page.locator('#history li[data-event="deploy"]').count() >= 1
    assert page.locator("#lineage a").first.get_attribute("href") == "/dags/iris_ct/runs/manual__ui"
    page.screenshot(path=str(shots / "detail.png"), full_page=True)

    # Stop, then start the real server from the list: registry and CLI agree.
    page.goto(f"{server.url}/served-models/?")
    page.fill("#f-model", "iris-ui")
    page.click("#apply")
    # The unfiltered first page holds this row too: click only once the filtered answer is drawn, or
    # the click can land as the table is redrawn under it (then nothing is clicked).
    page.locator("#range").filter(has_text="1-1 of 1").wait_for()
    _row(page, ui["real"]).locator('[data-action="stop"]').click()
    _row(page, ui["real"]).locator(".state").filter(has_text="Stopped").wait_for()
    assert "stopped" in page.locator("#notice").inner_text()
    assert ui["registry"].get_service(ui["real"]).state == "inactive"
    assert _cli_services(ui, "iris_ct")[ui["real"]]["state"] == "inactive"
    _row(page, ui["real"]).locator('[data-action="start"]').click()
    _row(page, ui["real"]).locator(".state").filter(has_text="Running").wait_for(timeout=300_000)
    record = ui["registry"].get_service(ui["real"])
    assert record.state == "active"
    assert HTTP.get(record.health_url, timeout=30).status_code == 200
    history = ui["registry"].list_events("mlflow", "iris-ui")
    assert [e["actor"] for e in history[:2]] == [f"admin (Airflow UI on {HOSTNAME})"] * 2

    # Delete (after confirming) a stopped service.
    victim = ui["bulk"][0]
    page.fill("#f-model", "bulk-00000")
    page.click("#apply")
    _row(page, victim).wait_for()
    assert page.locator("#range").inner_text() == "1-1 of 1"
    page.once("dialog", lambda dialog: dialog.accept())
    _row(page, victim).locator('[data-action="delete"]').click()
    page.locator("#range").filter(has_text="no served models match").wait_for()
    assert not ui["registry"].find_services(service_uuid=victim)
    listed = _cli_services(ui, "bulk_dag_0")
    assert victim not in listed and len(listed) == BULK // 20 - 1
    page.context.close()


def test_browser_viewer_sees_no_actions(ui: dict[str, Any], browser: Any) -> None:
    server: ApiServer = ui["server"]
    # The page itself sends a signed-out browser to the login page, which brings it back once signed in.
    page = _signed_in(browser, server, "viewer", "/served-models/")
    page.locator("#range").filter(has_text="of 62").wait_for()
    assert _row(page, ui["real"]).locator(".state").inner_text() == "Running"
    assert page.locator("button[data-action]").count() == 0
    page.goto(f"{server.url}/served-models/services/{ui['real']}")
    page.locator("#health").filter(has_text="Healthy").wait_for()
    assert page.locator("button[data-action]").count() == 0
    # Calling an action directly, with the viewer's own session cookie.
    status = page.evaluate(
        """async (uuid) => (await fetch(`/served-models/api/services/${uuid}/stop`, {method: "POST",
             headers: {"Content-Type": "application/json"}, body: "{}"})).status""",
        ui["real"],
    )
    assert status == 403
    assert ui["registry"].get_service(ui["real"]).state == "active"
    page.context.close()


def test_browser_rollback_and_action_errors(ui: dict[str, Any], browser: Any, mlflow_models: dict[str, Any]) -> None:
    """v2 replaces v1 at the endpoint; the history's "Roll back to v1" serves v1 again at the same URL."""
    from airflow_provider_modeldeploy.deployers import get_model_deployer
    from airflow_provider_modeldeploy.services import Lineage, ServiceConfig

    server: ApiServer = ui["server"]
    url = ui["registry"].get_service(ui["real"]).prediction_url
    v2 = get_model_deployer().deploy_model(
        ServiceConfig(model_uri=mlflow_models["iris_v2"], model_name="iris", endpoint="iris-ui"),
        lineage=Lineage(dag_id="iris_ct", run_id="manual__ui2", task_id="deploy", try_number=1),
    )
    assert v2.prediction_url == url
    page = _page_as(browser, server, "admin")
    page.goto(f"{server.url}/served-models/services/{v2.uuid}")
    page.locator('[data-prop="model_version"]').filter(has_text="2").wait_for()
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator('button[data-action="rollback"]').filter(has_text="v1").click()
    page.locator('[data-prop="model_version"]').filter(has_text="1").wait_for(timeout=300_000)
    page.locator("#title .state").filter(has_text="Running").wait_for()
    restored = ui["registry"].find_services(endpoint="iris-ui")
    assert len(restored) == 1 and restored[0].model_version == "1" and restored[0].prediction_url == url
    assert restored[0].uuid in page.url
    events = ui["registry"].list_events("mlflow", "iris-ui")
    assert events[0]["action"] == "rollback" and events[0]["actor"] == f"admin (Airflow UI on {HOSTNAME})"
    assert page.locator('#history li[data-event="rollback"]').first.inner_text().startswith("Rolled back")
    ui["real"] = restored[0].uuid
    page.context.close()

    # An action that fails reports why, as JSON, and changes nothing else.
    with server.client("admin") as admin:
        resp = admin.post(f"/api/services/{ui['bulk'][1]}/start", json={"timeout": 60})
    assert 400 <= resp.status_code < 500, resp.text
    assert "bulk-model-1" in resp.json()["detail"] and "Traceback" not in resp.text
    assert ui["registry"].get_service(ui["real"]).state == "active"


# -- looks native in Airflow 3, in both colour modes ------------------------------------------------

IRIS_COLUMNS = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]
# A label with a snake_case word (model_run_id, map_index, status_label, ...): never on the detail page.
SNAKE = re.compile(r"\b[a-z0-9]+_[a-z0-9_]+\b")
LABELS = "#props dt, #lineage dt, h1, h2, h3, summary, th, .legend, #metrics-summary dt, #history .what"


def ui_artefacts() -> Path:
    """Screenshots kept after the run (not in the repository): ${MODELDEPLOY_TEST_ARTIFACTS}/ui."""
    root = Path(os.environ.get("MODELDEPLOY_TEST_ARTIFACTS") or "/var/tmp/modeldeploy-test-artifacts")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    shots = root / "ui"
    shots.mkdir(mode=0o700, exist_ok=True)
    shots.chmod(0o700)
    return shots


def _themed_page(browser: Any, server: ApiServer, user: str, mode: str) -> Any:
    """Signed in, with Airflow's colour mode set as its UI stores it (localStorage "theme") and the
    system preference set to the other mode, so that only following Airflow can get it right."""
    context = browser.new_context(
        viewport={"width": 1500, "height": 1000}, color_scheme="light" if mode == "dark" else "dark"
    )
    context.add_cookies([{"name": "_token", "value": server.token(user), "url": server.url}])
    context.add_init_script(f"window.localStorage.setItem('theme', '{mode}')")
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page = context.new_page()
    page.set_default_timeout(60_000)
    return page


AIRFLOW_BG = """() => { const probe = document.createElement("div"); probe.style.background = "var(--chakra-colors-bg)";
  document.body.append(probe); const bg = getComputedStyle(probe).backgroundColor; probe.remove(); return bg; }"""
OWN_BG = "() => getComputedStyle(document.body).backgroundColor"


def test_browser_follows_airflows_colour_mode(ui: dict[str, Any], browser: Any) -> None:
    """In Airflow's frame the page takes Airflow's mode (not the system's), its background is Airflow's
    own `bg` token in each mode, and it follows a switch made in Airflow's UI while it is open."""
    server: ApiServer = ui["server"]
    shots = ui_artefacts()
    backgrounds = {}
    for mode in ("light", "dark"):
        page = _themed_page(browser, server, "admin", mode)
        page.goto(f"{server.url}/dags")
        page.locator("html." + mode).wait_for(state="attached")
        page.get_by_text("Served Models").first.wait_for()
        page.screenshot(path=str(shots / f"airflow-dags-{mode}.png"))
        page.goto(f"{server.url}/plugin/served-models")
        frame = page.frame_locator("iframe")
        frame.locator("#range").filter(has_text="of").wait_for()
        # (Airflow's router shows /plugin/served-models/served-models/: the main frame's URL ends alike.)
        inner = next(f for f in page.frames if f is not page.main_frame and f.url.endswith("/served-models/"))
        assert inner.evaluate("document.documentElement.className") == mode
        backgrounds[mode] = page.evaluate(AIRFLOW_BG)
        assert inner.evaluate(OWN_BG) == backgrounds[mode], (mode, inner.evaluate(OWN_BG), backgrounds[mode])
        page.wait_for_timeout(500)  # the sparklines' request
        page.screenshot(path=str(shots / f"list-{mode}.png"))
        # Switched in Airflow's UI (next-themes swaps the class on Airflow's <html>): the page follows.
        other = "dark" if mode == "light" else "light"
        page.evaluate(f"document.documentElement.classList.replace('{mode}', '{other}')")
        inner.wait_for_function(f"document.documentElement.className === '{other}'")
        assert inner.evaluate(OWN_BG) != backgrounds[mode]
        page.context.close()
    assert backgrounds["light"] == "rgb(255, 255, 255)" and backgrounds["dark"] != backgrounds["light"]


def test_browser_detail_page_labels_copy_try_and_timeline(ui: dict[str, Any], browser: Any) -> None:
    server: ApiServer = ui["server"]
    shots = ui_artefacts()
    record = ui["registry"].get_service(ui["real"])
    for mode in ("light", "dark"):
        page = _themed_page(browser, server, "admin", mode)
        page.goto(f"{server.url}/served-models/services/{record.uuid}")
        page.locator("#health").filter(has_text="Healthy").wait_for()
        page.locator("#curl").wait_for()
        page.wait_for_function("document.querySelector('#metrics').dataset.state !== 'loading'")
        assert page.evaluate("document.documentElement.className") == mode
        page.screenshot(path=str(shots / f"detail-{mode}.png"), full_page=True)
        if mode == "dark":
            page.context.close()
            continue

        # Human labels, and not one snake_case key among them.
        labels = [t.strip() for t in page.locator(LABELS).all_inner_texts() if t.strip()]
        for wanted in ("Model", "Version", "Prediction URL", "Deployed by", "MLflow run", "Try", "History", "Lineage"):
            assert wanted in labels, (wanted, labels)
        assert not [t for t in labels if SNAKE.search(t)], [t for t in labels if SNAKE.search(t)]
        # The version served now was brought back by the rollback of the test before.
        assert page.locator('[data-prop="deployed_by"]').inner_text() == f"admin (Airflow UI on {HOSTNAME})"
        # Long values are collapsed: the settings and the XCom are <details>, closed.
        assert page.locator("#props details, #lineage details").evaluate_all("ds => ds.every(d => !d.open)")

        # The copy button copies the prediction URL.
        page.locator('[data-prop="prediction_url"] + button[data-copy]').click()
        page.locator("#notice").filter(has_text="Copied the prediction URL").wait_for()
        assert page.evaluate("navigator.clipboard.readText()") == record.prediction_url

        # The curl example: copied whole, a dataframe_split body naming the model's columns, and it
        # works against the real model server.
        curl = page.locator("#curl").inner_text()
        page.locator("#try button[data-copy]").click()
        page.locator("#notice").filter(has_text="Copied the curl example").wait_for()
        assert page.evaluate("navigator.clipboard.readText()").strip() == curl.strip()
        argv = shlex.split(curl.replace("\\\n", " "))
        body = json.loads(argv[argv.index("-d") + 1])
        assert body["dataframe_split"]["columns"] == IRIS_COLUMNS
        [row] = body["dataframe_split"]["data"]
        assert len(row) == 4 and all(isinstance(v, float) for v in row)
        assert record.prediction_url in argv
        done = subprocess.run([*argv, "-w", "\n%{http_code}"], capture_output=True, text=True, timeout=60, check=False)
        answer, status = done.stdout.rsplit("\n", 1)
        assert done.returncode == 0 and status == "200", (done.stdout, done.stderr)
        assert len(json.loads(answer)["predictions"]) == 1

        # The history as a timeline: every event of the endpoint, newest first, each with its time.
        events = ui["registry"].list_events("mlflow", "iris-ui")
        items = page.locator("#history li[data-event]")
        assert items.count() == len(events)
        assert [items.nth(i).get_attribute("data-event") for i in range(items.count())] == [e["action"] for e in events]
        assert {"deploy", "replace", "rollback"} <= {e["action"] for e in events}
        assert page.locator("#history li[data-event] time").count() == len(events)

        # A running local service has metrics (its traffic is test_browser_charts_from_real_traffic's).
        assert page.locator("#metrics").get_attribute("data-state") == "ready"
        assert page.locator("#metrics svg[data-chart]").count() == 3
        page.context.close()


def _metrics_payload(uuid: str) -> dict[str, Any]:
    """A response of the metrics route's contract (checked against its response model below): main
    v1 with 150 requests and 5 errors, canary v2 with 50 and 5, one replace and one canary event."""
    from datetime import UTC, datetime, timedelta

    end = datetime.now(UTC).replace(second=0, microsecond=0)
    start = end - timedelta(hours=1)

    def points(requests: list[int], errors: list[int]) -> list[dict[str, Any]]:
        return [
            {"t": (start + timedelta(minutes=i)).isoformat(), "requests": r, "errors": e, "client_errors": e,
             "server_errors": 0, "rows": r, "p50_ms": 4.0 if r else None, "p95_ms": 9.0 if r else None,
             "p99_ms": 15.0 if r else None}
            for i, (r, e) in enumerate(zip(requests, errors, strict=True))
        ]  # fmt: skip

    main = [0] * 60
    main[10], main[40] = 100, 50
    canary = [0] * 60
    canary[45] = 50
    return {
        "uuid": uuid, "window": "1h", "step_seconds": 60, "start": start.isoformat(), "end": end.isoformat(),
        "available": True, "reason": None, "source": "prometheus",
        "versions": [
            {"model_version": "2", "role": "canary", "points": points(canary, [0] * 45 + [5] + [0] * 14)},
            {"model_version": "1", "role": "main", "points": points(main, [0] * 10 + [5] + [0] * 49)},
        ],
        "summary": {"requests": 200, "errors": 10, "error_rate": 0.05, "requests_per_minute": 3.33,
                    "p50_ms": 4.0, "p95_ms": 9.0, "p99_ms": 15.0, "in_flight": 0, "rows": 200},
        "events": [{"t": (start + timedelta(minutes=5)).isoformat(), "action": "replace", "model_version": "1"},
                   {"t": (start + timedelta(minutes=44)).isoformat(), "action": "canary", "model_version": "2"}],
    }  # fmt: skip


def _box_totals(box: Any) -> tuple[str | None, ...]:
    return tuple(box.get_attribute(a) for a in ("data-requests", "data-errors", "data-error-rate"))


def _group_totals(group: Any) -> tuple[str | None, ...]:
    return tuple(group.get_attribute(a) for a in ("data-role", "data-requests", "data-errors", "data-error-rate"))


def test_browser_charts_draw_a_canary_beside_main(ui: dict[str, Any], browser: Any) -> None:
    """A canary beside main, as the Kubernetes backends report it (no cluster here: the browser serves a
    response that the metrics route's own response model accepts): per version totals, a colour per
    version, event markers. Real traffic is test_browser_charts_from_real_traffic's."""
    from airflow_provider_modeldeploy.plugins.metrics_api import ServiceMetricsModel, SparklinesModel

    server: ApiServer = ui["server"]
    uuid = ui["real"]
    page = _themed_page(browser, server, "admin", "light")
    payload = ServiceMetricsModel.model_validate(_metrics_payload(uuid)).model_dump(mode="json")
    page.route("**/api/services/*/metrics*", lambda route: route.fulfill(json=payload))
    spark = SparklinesModel.model_validate(
        {"services": {uuid: {"available": True, "reason": None, "requests_per_minute": [3] * 60, "p95_ms": [9.0] * 60}}}
    ).model_dump(mode="json")
    page.route("**/api/metrics/sparklines*", lambda route: route.fulfill(json=spark))
    page.goto(f"{server.url}/served-models/services/{uuid}")
    page.locator('#metrics[data-state="ready"]').wait_for()
    box = page.locator("#metrics")
    assert _box_totals(box) == ("200", "10", "0.0500")
    for chart in ("requests", "errors", "latency"):
        groups = page.locator(f'svg[data-chart="{chart}"] g[data-version]')
        assert groups.count() == 2
        assert _group_totals(groups.nth(0)) == ("main", "150", "5", "0.0333")
        assert _group_totals(groups.nth(1)) == ("canary", "50", "5", "0.1000")
        colours = [groups.nth(i).evaluate("g => getComputedStyle(g).stroke") for i in range(2)]
        assert colours[0] != colours[1], colours
        assert page.locator(f'svg[data-chart="{chart}"] g.marker').count() == 2
    assert page.locator('svg[data-chart="latency"] path.series').count() == 6  # p50, p95, p99 per version
    assert page.locator('#metrics-summary [data-stat="error-rate"]').inner_text() == "5.0 %"
    assert page.locator("#metrics-legend").inner_text().startswith("v1 (main)")
    page.locator("#window-1d").click()
    page.wait_for_function("document.querySelector('#metrics').dataset.window === '1d'")
    page.screenshot(path=str(ui_artefacts() / "detail-canary-light.png"), full_page=True)

    page.goto(f"{server.url}/served-models/")
    spark_node = _row(page, uuid).locator(".spark")
    spark_node.wait_for()
    assert spark_node.get_attribute("data-requests") == "180"
    page.context.close()


TRAFFIC_GOOD, TRAFFIC_BAD = 190, 10


def _send_traffic(prediction_url: str) -> None:
    """200 prediction requests, 10 of them bad (a column the model does not have: MLflow answers 400),
    until the server's own /metrics counts them all (a request is recorded once its answer is sent)."""
    from conftest import iris_payload, wait_for

    bad = {"dataframe_split": {"columns": ["no such column", *IRIS_COLUMNS[1:]], "data": [[1.0, 2.0, 3.0, 4.0]]}}
    statuses = []
    with httpx.Client(timeout=30) as client:
        for i in range(TRAFFIC_GOOD + TRAFFIC_BAD):
            statuses.append(client.post(prediction_url, json=bad if i % 20 == 7 else iris_payload()).status_code)
        assert statuses.count(200) == TRAFFIC_GOOD and statuses.count(400) == TRAFFIC_BAD, statuses
        count = f'_count{{model_version="1"}} {float(TRAFFIC_GOOD + TRAFFIC_BAD)}'
        wait_for(
            lambda: count in client.get(prediction_url.replace("/invocations", "/metrics")).text,
            10, "all 200 requests on the server's /metrics",
        )  # fmt: skip


def test_browser_charts_from_real_traffic(ui: dict[str, Any], browser: Any, mlflow_models: dict[str, Any]) -> None:
    """A real local model server gets 200 requests (10 bad, answered 400 by MLflow); once the serving
    agent has sampled it, the detail page's charts (light and dark) say 200 requests, 10 errors, 5 % for
    v1 and the list's sparkline counts the 200. A Seldon service whose connection names no Prometheus
    shows the reason, not charts, on both pages."""
    from airflow_provider_modeldeploy.deployers import get_model_deployer
    from airflow_provider_modeldeploy.hooks.serving_agent import local_agent
    from airflow_provider_modeldeploy.services import ServiceConfig, ServiceRecord, ServiceState

    server: ApiServer = ui["server"]
    registry = ui["registry"]
    shots = ui_artefacts()
    deployer = get_model_deployer()
    service = deployer.deploy_model(
        ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris", endpoint="iris-ui-traffic")
    )
    seldon = registry.add_service(
        ServiceRecord(
            uuid="5e1d0000-0000-4000-8000-000000000003", backend="seldon", endpoint="iris-seldon-noprom",
            model_name="iris", model_uri="models:/iris/1", model_version="1", state=ServiceState.ACTIVE,
            conn_id=SELDON_CONN, prediction_url="http://seldon.example/seldon/models/iris-seldon-noprom/api/v1.0/predictions",
        )
    )  # fmt: skip
    try:
        _send_traffic(service.prediction_url)
        assert local_agent(start=False).sample_metrics() >= 1
        for mode in ("light", "dark"):
            page = _themed_page(browser, server, "admin", mode)
            page.goto(f"{server.url}/served-models/services/{service.uuid}")
            page.locator('#metrics[data-state="ready"]').wait_for()
            box = page.locator("#metrics")
            assert _box_totals(box) == ("200", "10", "0.0500")
            for chart in ("requests", "errors", "latency"):
                [group] = page.locator(f'svg[data-chart="{chart}"] g[data-version]').all()
                assert group.get_attribute("data-version") == "1"
                assert _group_totals(group) == ("main", "200", "10", "0.0500"), chart
                # Something is drawn: a line over several minutes, or a dot for a lone busy minute.
                drawn = page.locator(
                    f'svg[data-chart="{chart}"] path.series[d*="L"], svg[data-chart="{chart}"] circle.dot'
                )
                assert drawn.count() >= 1, chart
                assert page.locator(f'svg[data-chart="{chart}"] g.marker[data-action="deploy"]').count() == 1
            assert page.locator('#metrics-summary [data-stat="requests"]').inner_text() == "200"
            assert page.locator('#metrics-summary [data-stat="error-rate"]').inner_text() == "5.0 %"
            assert page.locator("#metrics-empty").count() == 0
            assert page.evaluate("document.documentElement.className") == mode
            page.screenshot(path=str(shots / f"detail-traffic-{mode}.png"), full_page=True)

            page.goto(f"{server.url}/served-models/")
            page.fill("#f-model", "iris-ui-traffic")
            page.click("#apply")
            page.locator("#range").filter(has_text="1-1 of 1").wait_for()
            spark = _row(page, service.uuid).locator(".spark")
            spark.wait_for()
            assert spark.get_attribute("data-requests") == "200"
            assert float(spark.get_attribute("data-p95-ms")) > 0
            assert _row(page, service.uuid).locator(".spark path.line").count() == 1
            page.screenshot(path=str(shots / f"list-traffic-{mode}.png"), full_page=True)

            # No metrics source: the reason, on the detail page and as the list cell's title; no chart.
            reason = f"no metrics source: connection '{SELDON_CONN}' has no prometheus_url extra"
            page.goto(f"{server.url}/served-models/services/{seldon.uuid}")
            page.locator('#metrics[data-state="unavailable"]').wait_for()
            assert page.locator("#metrics-reason").inner_text().startswith(reason)
            assert page.locator("#metrics svg").count() == 0 and page.locator("#metrics-summary").count() == 0
            page.screenshot(path=str(shots / f"detail-no-metrics-{mode}.png"), full_page=True)
            page.goto(f"{server.url}/served-models/")
            page.fill("#f-model", "iris-seldon-noprom")
            page.click("#apply")
            cell = _row(page, seldon.uuid).locator("td.traffic")
            cell.filter(has_text="metrics unavailable").wait_for()
            assert cell.locator("[title]").get_attribute("title").startswith(reason)
            assert cell.locator(".spark").count() == 0
            page.context.close()
    finally:
        registry.delete_service(seldon.uuid)
        deployer.delete_model_server(service.uuid, timeout=30, force=True)


# -- fuzzing the JSON API ------------------------------------------------------------------------


def test_fuzz_json_api_never_5xx(ui: dict[str, Any]) -> None:
    """schemathesis on the plugin's own OpenAPI schema, as admin: 2xx or a 4xx with a message, never
    a server error. Runs last: its random uuids (hex, >= 4 characters) could at worst hit inactive
    bulk rows by prefix, whose start fails cleanly (no such model)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    server: ApiServer = ui["server"]
    with server.client("admin") as admin:
        resp = admin.get("/api/openapi.json")
    assert resp.status_code == 200
    schema = schemathesis.openapi.from_dict(resp.json())
    headers = {"Authorization": f"Bearer {server.token('admin')}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/api/services", "/api/services/{uuid}", "/api/services/{uuid}/stop"}
    called: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            response = case.call_and_validate(
                base_url=f"{server.url}/served-models", headers=headers, checks=[not_a_server_error]
            )
            called.append(response.status_code)

        check()
    assert len(called) >= 3 * len(operations) and any(200 <= c < 300 for c in called)
    assert ui["registry"].get_service(ui["real"]).state == "active"
