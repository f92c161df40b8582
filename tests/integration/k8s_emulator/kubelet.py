"""The emulator's kubelet: it starts the pods' model-server containers as processes forked from one
interpreter that has already imported what they need (MLflow, scikit-learn, skops, joblib, the servers'
modules), as the serving agent's fork server does for local model servers.

Each container exec'd as a new interpreter spent seconds of CPU importing those (skops alone walks
every scikit-learn estimator), and the tests start some 70 containers on a CPU-bound machine. A
container forked from here runs the same module's ``__main__`` with its own arguments, environment,
working directory, log and inherited socket, in a session of its own (the emulator stops a pod by
signalling its process group).

The containers are this process's children: it reaps them and answers the emulator's ``poll`` with
the exit code, so the emulator holds a ``Container`` like a ``subprocess.Popen``. A separate process
because the emulator serves requests from threads, and forking a threaded process is unsafe; this
one is single-threaded and exits when the emulator goes (its end of the socket pair closes).

Started by the emulator (``current()``), never by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any, NoReturn

from cli_forker import recv_line, run_as_main

MODULE = "k8s_emulator.kubelet"
#: What the containers import at start-up, besides the serving agent's fork server's list (the model
#: server's libraries): KServe's sklearn server stand-in and what it loads models with.
PRELOAD = ("joblib", "k8s_emulator.sklearn_server")


class Kubelet:
    """The emulator's handle on its kubelet process (thread-safe: one request at a time)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", MODULE, "--fd", str(child.fileno())],
            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, cwd="/",
        )  # fmt: skip
        child.close()
        self.channel = parent
        self.file = parent.makefile("rb")

    def _ask(self, request: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
        with self.lock:
            socket.send_fds(self.channel, [json.dumps(request).encode() + b"\n"], fds or [])
            line = self.file.readline()
        if not line:
            raise RuntimeError(f"the emulator's kubelet exited ({self.proc.poll()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the emulator's kubelet: {answer['error']}")
        return answer

    def run(
        self, module: str, args: list[str], env: dict[str, str], cwd: str, log: int, listen: int | None = None
    ) -> Container:
        """``python -m module *args`` as a container: ``log`` its stdout and stderr; ``listen`` (a
        socket) passed on, ``{listen_fd}`` in ``args`` replaced by its number in the container."""
        request = {"op": "run", "module": module, "args": args, "env": env, "cwd": cwd}
        return Container(self, self._ask(request, [log] if listen is None else [log, listen])["pid"])

    def close(self) -> None:
        self.channel.close()
        self.file.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


_current: Kubelet | None = None
_current_lock = threading.Lock()


def current() -> Kubelet:
    """The emulator's kubelet, started on first use (the emulator starts it early: ``main``)."""
    global _current
    with _current_lock:
        if _current is None:
            _current = Kubelet()
        return _current


def stop() -> None:
    global _current
    with _current_lock:
        if _current is not None:
            _current.close()
            _current = None


class Container:
    """A container's process, as ``subprocess.Popen`` shows a child: ``pid``, ``poll``, ``wait``."""

    def __init__(self, kubelet: Kubelet, pid: int) -> None:
        self.kubelet, self.pid = kubelet, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.kubelet._ask({"op": "poll", "pid": self.pid})["code"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"container {self.pid}", timeout or 0)
            time.sleep(0.02)
        return code


# -- in the kubelet process ----------------------------------------------------------------------


def _run_container(request: dict[str, Any], fds: list[int]) -> NoReturn:
    """In the forked child: become ``python -m <module> <args>``."""
    import runpy

    try:
        os.setsid()  # signal dispositions: the interpreter's at start-up (this process sets none)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[0], 2)
        for fd in {null, fds[0]} - {0, 1, 2}:
            os.close(fd)
        listen = str(fds[1]) if len(fds) > 1 else ""
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = [request["module"], *(arg.replace("{listen_fd}", listen) for arg in request["args"])]
    except BaseException:
        os._exit(1)
    run_as_main(lambda: runpy.run_module(request["module"], run_name="__main__", alter_sys=True))


def main(argv: list[str] | None = None) -> int:
    import argparse
    import gc
    import importlib

    parser = argparse.ArgumentParser(prog=MODULE, description=__doc__.split("\n", 1)[0])
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args(argv)
    channel = socket.socket(fileno=args.fd)
    from airflow_provider_modeldeploy.serving import forkserver

    for name in (*forkserver.PRELOAD, *PRELOAD):
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    gc.collect()
    gc.freeze()  # the preloaded objects stay shared with the containers (no copy-on-collect)
    exited: dict[int, int] = {}
    while True:
        fds: list[int] = []
        try:
            request = json.loads(recv_line(channel, fds))
        except OSError:
            return 0  # the emulator is gone
        while True:  # reap what exited since the last request
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            exited[pid] = os.waitstatus_to_exitcode(status)
        try:
            if request["op"] == "poll":
                answer: dict[str, Any] = {"code": exited.get(request["pid"])}
            else:
                pid = os.fork()
                if pid == 0:
                    channel.close()
                    _run_container(request, fds)
                # An exit recorded for this pid can only be an earlier process's: the new container is
                # alive, and a poll must not answer that exit for it (seen once: a forked container
                # found its own pid among those exited, its pod never became ready and its processes
                # were left behind, as the emulator took the live server for an exited one).
                exited.pop(pid, None)
                answer = {"pid": pid}
        except Exception as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            for fd in fds:  # the container has its copies
                with contextlib.suppress(OSError):
                    os.close(fd)
        channel.sendall(json.dumps(answer).encode() + b"\n")


if __name__ == "__main__":
    sys.exit(main())
