"""The serving agent's fork server: an interpreter with MLflow, scikit-learn, pandas and uvicorn
already imported, that forks model servers on request.

Importing those libraries is most of a model server's start-up (seconds); a server forked from here
starts with them in memory, so a warm deploy costs the model's own load and the checks only, and the
servers share those pages with this process (``gc.freeze()`` keeps the collector from touching, hence
copying, them).

It is a child of the agent and talks only to it, over a socket pair it inherits (no path anyone
could squat). It exits when the agent goes. Each server is double-forked into its own session: the
agent, a child subreaper, becomes its parent, and the server outlives both. Nothing here rewrites a
process's command line or environment: the agent knows its servers by pid and start time.

A separate process because the agent answers requests from threads, and forking a threaded process
is unsafe; this one is single-threaded. Only the standard library is imported at module level.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import signal
import socket
import sys
import time
from typing import Any

MODULE = "airflow_provider_modeldeploy.serving.forkserver"
#: What every model server needs and takes seconds to import: imported before the fork server says it
#: is ready, so that even the first deploy on a host (the agent just started) forks from it.
ESSENTIAL = (
    "numpy", "pandas", "sklearn", "sklearn.base", "mlflow", "mlflow.pyfunc", "mlflow.pyfunc.scoring_server",
    "mlflow.sklearn", "mlflow.models", "mlflow.tracking", "mlflow.artifacts", "uvicorn",
    "uvicorn.protocols.http.httptools_impl", "uvicorn.lifespan.off", "uvicorn.loops.auto",
    "airflow_provider_modeldeploy.serving.mlflow_server",
)  # fmt: skip
#: What many servers need: imported once ready, one module at a time while no fork is asked for (a
#: server forked before imports what it needs itself, in parallel).
EXTRA = (
    "sklearn.linear_model", "sklearn.ensemble", "sklearn.tree", "sklearn.pipeline", "sklearn.preprocessing",
    "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
    # MLflow 3 saves scikit-learn models with skops, whose import walks every estimator (seconds).
    "skops.io", "mlflow.store.db.utils", "alembic.runtime.migration", "alembic.script",
)  # fmt: skip
PRELOAD = ESSENTIAL + EXTRA


class ForkServerError(Exception):
    """The fork server did not fork the server (gone, or refused)."""


def request_fork(channel: socket.socket, argv: list[str], env: dict[str, str], cwd: str, fds: list[int]) -> int:
    """Ask the fork server on ``channel`` for a model server; its pid. The caller serialises calls.

    :param argv: the server's arguments (``--service-uuid ...``, as ``mlflow_server.main`` takes them);
        ``{fd0}``, ``{fd1}``... are replaced by the numbers the passed descriptors get in the server.
    :param fds: the first two become the server's stdout and stderr (its log); the others are passed on.
    """
    request = json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode() + b"\n"
    try:
        socket.send_fds(channel, [request], fds)
        answer = _recv_line(channel)
    except (OSError, ValueError) as exc:
        raise ForkServerError(f"the fork server is gone ({exc})") from None
    if not answer.get("ok"):
        raise ForkServerError(answer.get("error", "the fork server refused"))
    return int(answer["pid"])


def _recv_line(sock: socket.socket, fds: list[int] | None = None) -> dict[str, Any]:
    buf = b""
    while not buf.endswith(b"\n"):
        data, got, _flags, _addr = socket.recv_fds(sock, 1 << 20, 16)
        if fds is not None:
            fds.extend(got)
        else:
            for fd in got:
                os.close(fd)
        if not data:
            raise OSError("connection closed")
        buf += data
    return json.loads(buf)


def _log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [forkserver pid={os.getpid()}] {msg}", file=sys.stderr, flush=True)


def _become_server(request: dict[str, Any], fds: list[int]) -> None:
    """In the forked server: take the agent's environment, log and socket for it; run it."""
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    passed = {}
    for index, fd in enumerate(fds):
        if index >= 2:
            os.set_inheritable(fd, True)
        passed[f"{{fd{index}}}"] = str(fd)
    argv = [passed.get(arg, arg) for arg in request["argv"]]
    for fd in fds[:2]:
        if fd not in (1, 2):
            os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    # The preloaded objects stay frozen (gc.freeze() above): a collection in the server never walks,
    # hence never copies, them. The server's own objects are collected as usual.
    from airflow_provider_modeldeploy.serving import mlflow_server

    code = 1
    try:
        code = mlflow_server.main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _fork_server(request: dict[str, Any], fds: list[int], channel: socket.socket) -> int:
    """Double fork: the server is in its own session and is not this process's child."""
    pid_r, pid_w = os.pipe()
    first = os.fork()
    if first == 0:
        code = 1
        try:
            os.close(pid_r)
            channel.close()
            os.setsid()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            server = os.fork()
            if server == 0:
                try:
                    os.close(pid_w)
                    _become_server(request, fds)
                finally:
                    os._exit(1)
            os.write(pid_w, str(server).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(pid_w)
    data = b""
    while chunk := os.read(pid_r, 64):
        data += chunk
    os.close(pid_r)
    os.waitpid(first, 0)
    if not data:
        raise RuntimeError("the server could not be forked")
    return int(data)


def _preload(name: str) -> None:
    import importlib

    try:
        importlib.import_module(name)
    except Exception as exc:  # a missing optional library must not keep the fork server from serving
        _log(f"could not preload {name}: {type(exc).__name__}: {exc}")


def _preload_package_map() -> None:
    # Loading a model checks its requirements against the installed distributions; the map of
    # modules to distributions is built once per process (a scan of every installed package).
    try:
        from mlflow.utils import requirements_utils

        requirements_utils._init_packages_to_modules_map()
    except Exception as exc:
        _log(f"could not preload the package map: {type(exc).__name__}: {exc}")


def _freeze() -> None:
    import gc

    gc.collect()
    gc.freeze()  # what is imported now stays shared with every forked server (no copy-on-collect)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog=MODULE, description=__doc__.split("\n", 1)[0])
    parser.add_argument("--fd", type=int, required=True, help="the socket shared with the agent")
    args = parser.parse_args(argv)
    from airflow_provider_modeldeploy.serving.mlflow_server import _set_pdeathsig

    _set_pdeathsig(signal.SIGTERM)
    channel = socket.socket(fileno=args.fd)
    for name in ESSENTIAL:
        _preload(name)
    _freeze()
    channel.sendall(b'{"ready": true}\n')
    _log("ready")
    extra = [*(functools.partial(_preload, name) for name in EXTRA), _preload_package_map, _freeze]
    while True:
        while extra and not select.select([channel], [], [], 0)[0]:
            extra.pop(0)()  # a request waits at most for one import
        fds: list[int] = []
        try:
            request = _recv_line(channel, fds)
        except (OSError, ValueError):
            return 0  # the agent is gone
        try:
            if len(fds) < 2:
                raise ValueError("a log file descriptor is required")
            answer: dict[str, Any] = {"ok": True, "pid": _fork_server(request, fds, channel)}
        except Exception as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        try:
            channel.sendall(json.dumps(answer).encode() + b"\n")
        except OSError:
            return 0


if __name__ == "__main__":
    sys.exit(main())
