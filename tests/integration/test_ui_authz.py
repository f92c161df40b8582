"""The Served Models page authorizes like Airflow: per DAG (teams included), rollbacks against both
versions, cookie writes only from the page's own origin, long actions in a bounded pool answering 202.

A real ``airflow api-server`` with Airflow's SimpleAuthManager in multi-team form (users
``name:role:team``): DAGs belong to teams through their bundle, exactly the metadata rows Airflow's
DAG processor writes for a team's bundle. The registry (on the real PostgreSQL) holds rows only (no
model server): every outcome here is decided before a backend is touched, or by an agent that never
answers.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import migrated_pg_registry, pg_schema
from local_http import HTTP
from ui_helpers import ApiServer, running_api_server, ui_environment

from airflow_provider_modeldeploy.registry.store import HOSTNAME

USERS = {"admin": "admin", "alice": "user:team_a", "bob": "viewer:team_b", "carol": "viewer"}
# DAG -> team of its bundle (None: a bundle of no team)
DAGS = {"a_train": "team_a", "a_other": "team_a", "b_train": "team_b", "shared_dag": None}
TOKEN = "agent-token-for-tests-0123456789"


def _seed_dags(db: Path) -> None:
    """What the DAG processor writes for bundles owned by teams: bundle, team, their link, the DAGs."""
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        for team in {t for t in DAGS.values() if t}:
            conn.execute("INSERT INTO team (name) VALUES (?)", (team,))
        for bundle, team in (("bundle_a", "team_a"), ("bundle_b", "team_b"), ("bundle_shared", None)):
            conn.execute("INSERT INTO dag_bundle (name, active) VALUES (?, 1)", (bundle,))
            if team:
                conn.execute("INSERT INTO dag_bundle_team (dag_bundle_name, team_name) VALUES (?, ?)", (bundle, team))
        for dag_id, team in DAGS.items():
            bundle = {"team_a": "bundle_a", "team_b": "bundle_b", None: "bundle_shared"}[team]
            conn.execute(
                "INSERT INTO dag (dag_id, is_paused, is_stale, bundle_name, timetable_type, partition_mapper_info,"
                " max_active_tasks, max_consecutive_failed_dag_runs, has_task_concurrency_limits)"
                " VALUES (?, 0, 0, ?, 'NullTimetable', '{}', 16, 0, 0)",
                (dag_id, bundle),
            )


class SilentAgent:
    """A TCP "serving agent" that accepts connections and never answers: actions on its services
    take until the client's timeout, deterministically; until it hangs up (then it closes every
    connection without a word, and actions fail at once)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.hung_up = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn = self.sock.accept()[0]
                if self.hung_up:
                    conn.close()
                else:
                    self.held.append(conn)

    def hang_up(self) -> None:
        self.hung_up = True
        for conn in self.held:
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture(scope="module")
def authz(tmp_path_factory: pytest.TempPathFactory, airflow_db_template: Path) -> Iterator[dict[str, Any]]:
    from airflow_provider_modeldeploy.registry import get_registry
    from airflow_provider_modeldeploy.services import ServiceRecord, ServiceState

    base = tmp_path_factory.mktemp("authz")
    home = base / "airflow"
    # The registry on the real PostgreSQL (the other UI tests read SQLite), migrated by the explicit step.
    schema = pg_schema()
    url = migrated_pg_registry(schema.__enter__())
    silent = SilentAgent()
    try:
        with ui_environment(home, url, AIRFLOW__MODELDEPLOY__AGENT_TOKEN=TOKEN), running_api_server(
            home, users=USERS, migrated=lambda h: _seed_dags(h / "airflow.db"), template=airflow_db_template,
            AIRFLOW__CORE__MULTI_TEAM="True", AIRFLOW__MODELDEPLOY__UI_MAX_CONCURRENT_ACTIONS="1",
        ) as server:  # fmt: skip
            registry = get_registry(url)
            rows = {}
            spares = (("spare_1", None), ("spare_2", None))
            for name, dag_id in (*((d, d) for d in DAGS), ("no_dag", None), ("gone_dag", "deleted_dag"), *spares):
                rows[name] = registry.add_service(
                    ServiceRecord(
                        uuid=str(uuidlib.uuid4()),
                        backend="mlflow", endpoint=f"ep-{name.replace('_', '-')}", model_name=name,
                        model_uri=f"models:/{name}/2", model_version="2", state=ServiceState.INACTIVE,
                        dag_id=dag_id, run_id="manual__1" if dag_id else None, task_id="deploy" if dag_id else None,
                        # the cookie test's target answers at once (this host's agent); the rest never
                        **({"host": HOSTNAME} if name == "shared_dag" else {"host": "serving", "agent_url": silent.url}),
                    )
                ).uuid  # fmt: skip
            yield {"server": server, "registry": registry, "rows": rows, "silent": silent}
    finally:
        silent.close()
        get_registry(url).dispose()
        schema.__exit__(None, None, None)


def _listed(server: ApiServer, user: str) -> set[str]:
    with server.client(user) as client:
        page = client.get("/api/services", params={"limit": 500})
    assert page.status_code == 200, page.text
    body = page.json()
    assert body["total"] == len(body["services"])
    return {s["model_name"] for s in body["services"]}


def test_reads_follow_dag_permissions_and_teams(authz: dict[str, Any]) -> None:
    server, rows = authz["server"], authz["rows"]
    everything = set(rows)
    # admin reads all; alice (team_a) her team's DAGs, the team-less DAG and services outside a DAG;
    # bob (team_b, viewer) his; carol (no team) only what belongs to no team.
    team_free = {"shared_dag", "no_dag", "gone_dag", "spare_1", "spare_2"}
    expected = {
        "admin": everything,
        "alice": {"a_train", "a_other"} | team_free,
        "bob": {"b_train"} | team_free,
        "carol": team_free,
    }
    for user, names in expected.items():
        assert _listed(server, user) == names, user
    with server.client("bob") as bob:
        for name in ("a_train", "a_other"):
            for path in ("", "/logs", "/health"):
                resp = bob.get(f"/api/services/{rows[name]}{path}")
                assert resp.status_code == 403, (name, path, resp.text)
                assert "read permission on the DAG" in resp.json()["detail"] and "models:/" not in resp.text
            page = bob.get(f"/services/{rows[name]}", headers={"Accept": "text/html"})
            assert page.status_code == 403 and name not in page.text
        assert bob.get(f"/api/services/{rows['b_train']}").status_code == 200
        # The deploy task's XCom is read with Airflow's XCom permission on that DAG.
        assert bob.get(f"/api/services/{rows['b_train']}").json()["lineage"]["airflow"]["xcom"] == []


def test_writes_need_edit_on_the_dag(authz: dict[str, Any]) -> None:
    server, rows, registry = authz["server"], authz["rows"], authz["registry"]
    before = {u: registry.get_service(u).state for u in rows.values()}
    with server.client("bob") as bob:  # a viewer of team_b
        resp = bob.post(f"/api/services/{rows['b_train']}/start", json={"wait": 0})
        assert resp.status_code == 403 and "edit permission" in resp.json()["detail"], resp.text
        resp = bob.post(f"/api/services/{rows['b_train']}/promote", json={"wait": 0})
        assert resp.status_code == 403 and "edit permission" in resp.json()["detail"], resp.text
    with server.client("alice") as alice:  # a user of team_a: may edit team_a's DAGs only
        for name in ("b_train",):
            resp = alice.post(f"/api/services/{rows[name]}/stop", json={})
            assert resp.status_code == 403, resp.text
            assert alice.delete(f"/api/services/{rows[name]}").status_code == 403
    assert {u: registry.get_service(u).state for u in rows.values()} == before


def test_rollback_is_authorized_against_the_version_it_restores(authz: dict[str, Any]) -> None:
    """alice may edit a_train, but the version its endpoint would go back to was deployed by team_b's
    DAG: refused, naming that DAG, and nothing changes."""
    server, rows, registry = authz["server"], authz["rows"], authz["registry"]
    current = registry.get_service(rows["a_train"])
    earlier = "01dde9a1-0000-4000-8000-000000000099"
    for uuid, dag_id, previous in ((earlier, "b_train", None), (current.uuid, "a_train", earlier)):
        registry.add_event(
            "mlflow", current.endpoint, "deploy" if previous is None else "replace", service_uuid=uuid,
            actor="test", message="seeded",
            details={"model_uri": f"models:/{dag_id}/1", "served_uri": None, "model_version": "1",
                     "dag_id": dag_id, "run_id": "manual__1", "task_id": "deploy", "previous_uuid": previous},
        )  # fmt: skip
    events = len(registry.list_events("mlflow", current.endpoint))
    with server.client("alice") as alice:
        resp = alice.post(f"/api/services/{current.uuid}/rollback", json={"wait": 0})
    assert resp.status_code == 403, resp.text
    assert "b_train" in resp.json()["detail"]
    assert registry.find_services(endpoint=current.endpoint) == [current]
    assert len(registry.list_events("mlflow", current.endpoint)) == events


def _cookie_client(server: ApiServer, user: str, **headers: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"{server.url}/served-models", cookies={"_token": server.token(user)}, headers=headers, timeout=60
    )


def test_cookie_writes_need_the_page_origin_or_header(authz: dict[str, Any]) -> None:
    server, rows, registry = authz["server"], authz["rows"], authz["registry"]
    target = rows["shared_dag"]
    cases = [
        ({"Origin": "http://evil.example"}, "POST"),
        ({"Origin": "http://evil.example", "X-Served-Models": "1"}, "POST"),  # the header cannot excuse a bad Origin
        ({}, "POST"),  # neither: a cross-site request from a browser that sends no Origin
        ({"Origin": "http://evil.example"}, "DELETE"),
        ({}, "DELETE"),
    ]
    for headers, method in cases:
        with _cookie_client(server, "admin", **headers) as client:
            resp = (
                client.post(f"/api/services/{target}/stop", json={})
                if method == "POST"
                else client.delete(f"/api/services/{target}")
            )
        assert resp.status_code == 403, (headers, method, resp.text)
        assert registry.get_service(target).state == "inactive"
    # The page's own origin, or its header, with the cookie; a Bearer token whatever the Origin.
    allowed = (
        _cookie_client(server, "admin", Origin=server.url),
        _cookie_client(server, "admin", **{"X-Served-Models": "1"}),
        httpx.Client(
            base_url=f"{server.url}/served-models", timeout=60,
            headers={"Authorization": f"Bearer {server.token('admin')}", "Origin": "http://elsewhere.example"},
        ),
    )  # fmt: skip
    for client in allowed:
        with client:
            resp = client.post(f"/api/services/{target}/stop", json={})
        # Past the origin check: done (200), or under way at this host's agent (202).
        assert resp.status_code in (200, 202), resp.text


def test_slow_actions_answer_202_are_bounded_and_leave_the_server_responsive(authz: dict[str, Any]) -> None:
    """Starts whose agent does not answer: the first answers 202 with progress, a second on the same
    service 409; with one action thread (and its queue of four) a sixth is refused 429, and
    meanwhile the API server answers reads and Airflow's own health at once."""
    server, rows, registry = authz["server"], authz["rows"], authz["registry"]
    names = ["a_train", "a_other", "b_train", "no_dag", "gone_dag", "spare_1", "spare_2"]
    with server.client("admin") as admin:
        first = admin.post(f"/api/services/{rows[names[0]]}/start", json={"wait": 0, "timeout": 5})
        assert first.status_code == 202, first.text
        action = first.json()["action"]
        assert action["state"] == "running" and first.headers["location"] == action["status_url"]
        again = admin.post(f"/api/services/{rows[names[0]]}/start", json={"wait": 0})
        assert again.status_code == 409 and "under way" in again.json()["detail"], again.text
        codes = [admin.post(f"/api/services/{rows[n]}/start", json={"wait": 0, "timeout": 5}) for n in names[1:]]
        # one thread and a queue of four: five actions under way at most, then 429 with Retry-After
        assert [c.status_code for c in codes] == [202] * 4 + [429] * 2, [c.text for c in codes]
        assert codes[-1].headers["retry-after"] and "under way" in codes[-1].json()["detail"]
        started = time.monotonic()
        assert admin.get("/api/services").status_code == 200
        assert HTTP.get(f"{server.url}/api/v2/monitor/health", timeout=10).status_code == 200
        assert time.monotonic() - started < 10
        # Polling: the action ends (the agent's hanging up is an error that names it) and says so. Not
        # waiting out the client's timeout (the start's 5 s and the agent client's 30 s margin): the
        # actions queued behind it end at once too.
        poll = admin.get(action["status_url"].removeprefix("/served-models"))
        assert poll.status_code == 202 and poll.json()["action"]["state"] == "running"
        authz["silent"].hang_up()
        deadline = time.monotonic() + 240
        while poll.status_code == 202 and time.monotonic() < deadline:
            time.sleep(1)
            poll = admin.get(action["status_url"].removeprefix("/served-models"))
        assert poll.status_code == 503, poll.text
        assert "serving agent" in poll.json()["detail"] and poll.json()["action"]["state"] == "failed"
    with server.client("bob") as bob:  # may not read a_train: its actions are not shown either
        assert bob.get(action["status_url"].removeprefix("/served-models")).status_code == 404
    assert registry.get_service(rows[names[0]]).state in ("inactive", "error")
    assert json.dumps(poll.json()).count(TOKEN) == 0
