"""Start, stop, rollback and delete from the page, without holding the API server's shared threads.

An action may take minutes (a model loading, a server draining). Run in a route, it would hold one of
the thread pool threads every API server route shares, so a few slow actions could stall Airflow's
own UI. Here each action runs in this module's small pool (``[modeldeploy] ui_max_concurrent_actions``
threads); the route awaits it for a few seconds without holding any thread, answers 200 with the
outcome if it finished by then, else 202 with the action's progress to poll (``GET /api/actions/ID``).
More actions than the pool and a short queue can hold are refused with 429; a second action on a
service that has one under way is refused with 409.

Progress is kept in this API server process: with ``[api] workers`` > 1, a poll that reaches another
worker gets 404 and the page falls back to the service's own state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import uuid as uuidlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Finished actions remembered for polling (oldest forgotten first).
KEEP_FINISHED = 200
#: Actions allowed to wait for a free thread, per thread of the pool.
QUEUE_PER_THREAD = 4


class TooBusy(Exception):
    """More actions are under way than the pool and its queue take."""


class ServiceBusy(Exception):
    """This service has an action under way."""

    def __init__(self, action: Action) -> None:
        super().__init__(f"{action.kind} of served model {action.service_uuid} is under way (action {action.id})")
        self.action = action


@dataclass
class Action:
    id: str
    kind: str
    service_uuid: str
    dag_ids: tuple[str | None, ...]  # what a poller must be allowed to read (the service may be gone)
    user: str
    state: str = "running"  # running | succeeded | failed
    status_code: int = 202
    message: str = ""
    service: dict[str, Any] | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    future: concurrent.futures.Future[Any] | None = field(default=None, repr=False)

    def to_json(self, base: str) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "service_uuid": self.service_uuid, "state": self.state,
            "status_code": self.status_code, "message": self.message, "service": self.service,
            "user": self.user, "started_at": self.started_at, "finished_at": self.finished_at,
            "status_url": f"{base}/api/actions/{self.id}",
        }  # fmt: skip


class ActionRunner:
    """The bounded pool and what it did (one per API server process, see ``runner``)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="served-models-action")
        self._lock = threading.Lock()
        self._actions: OrderedDict[str, Action] = OrderedDict()

    def submit(
        self,
        kind: str,
        service_uuid: str,
        dag_ids: tuple[str | None, ...],
        user: str,
        work: Callable[[], tuple[str, dict[str, Any] | None]],
        on_error: Callable[[BaseException], tuple[int, str]],
    ) -> Action:
        """Queue ``work`` (returns the message and the service's JSON); ``on_error`` maps a failure to a
        status code and a message for the page."""
        with self._lock:
            running = [a for a in self._actions.values() if a.state == "running"]
            for other in running:
                if other.service_uuid == service_uuid:
                    raise ServiceBusy(other)
            if len(running) >= self.threads * (1 + QUEUE_PER_THREAD):
                raise TooBusy(f"{len(running)} served-model actions are under way; try again shortly")
            action = Action(id=uuidlib.uuid4().hex, kind=kind, service_uuid=service_uuid, dag_ids=dag_ids, user=user)
            self._actions[action.id] = action
            self._forget_old()

        def run() -> None:
            try:
                action.message, action.service = work()
                action.state, action.status_code = "succeeded", 200
            except BaseException as exc:  # the pool's thread survives; the page sees why
                action.status_code, action.message = on_error(exc)
                action.state = "failed"
            finally:
                action.finished_at = time.time()

        action.future = self._pool.submit(run)
        return action

    def get(self, action_id: str) -> Action | None:
        with self._lock:
            return self._actions.get(action_id)

    def _forget_old(self) -> None:
        finished = [k for k, a in self._actions.items() if a.state != "running"]
        for key in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._actions[key]


async def wait(action: Action, seconds: float) -> bool:
    """Whether ``action`` finished within ``seconds``; waits on the event loop, holding no thread."""
    assert action.future is not None
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(action.future)), timeout=seconds)
    except TimeoutError:
        return False
    return True


_RUNNER: dict[str, ActionRunner] = {}
_RUNNER_LOCK = threading.Lock()


def runner() -> ActionRunner:
    with _RUNNER_LOCK:
        if "runner" not in _RUNNER:
            from airflow_provider_modeldeploy import config

            _RUNNER["runner"] = ActionRunner(config.ui_max_concurrent_actions())
        return _RUNNER["runner"]
