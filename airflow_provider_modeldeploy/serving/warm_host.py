"""A warm "serving host": a long-lived process with MLflow, scikit-learn, pandas and uvicorn already
imported, that forks model servers on request (forkserver-style).

Importing those libraries is most of a model server's start-up (seconds); a server forked from this
host starts with them in memory, so a warm deploy costs the model's own load and the checks only.

The host is started by the deployer on first use, in its own session, and exits after
``idle_timeout`` seconds without requests. Each server it forks is detached (double fork, own session:
its parent is init, not the host), so it outlives the host as it outlives the Airflow task, and it is
the same independent, tracked process tree as a server started with ``python -m ...mlflow_server``:
its process title is that command line (pid + command line identify it), its environment, working
directory and log are the deployer's, and it binds nothing itself (it gets the endpoint's listening
socket from the deployer, with SCM_RIGHTS).

One host per interpreter and provider source (the socket's name is a hash of both), so servers are
never forked from stale code after an upgrade. Only the standard library is imported at module
level: the deployer imports the client function in Airflow task processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HOST_MODULE = "airflow_provider_modeldeploy.serving.warm_host"
#: What a model server needs and takes seconds to import; imported once, in the host.
PRELOAD = (
    "numpy", "pandas", "sklearn", "sklearn.base", "sklearn.linear_model", "sklearn.ensemble", "sklearn.tree",
    "sklearn.pipeline", "sklearn.preprocessing", "mlflow", "mlflow.pyfunc", "mlflow.pyfunc.scoring_server",
    "mlflow.sklearn", "mlflow.models", "mlflow.tracking", "mlflow.artifacts", "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store", "uvicorn", "uvicorn.protocols.http.httptools_impl",
    "uvicorn.lifespan.off", "uvicorn.loops.auto", "airflow_provider_modeldeploy.serving.mlflow_server",
    # MLflow 3 saves scikit-learn models with skops, whose import walks every estimator (seconds).
    "skops.io", "mlflow.store.db.utils", "alembic.runtime.migration", "alembic.script",
)  # fmt: skip


CMDLINE_ROOM = 4096
ENV_ROOM = 65536
_ENV_ROOM_VAR = "_MODELDEPLOY_WARM_HOST_ENV_ROOM"


class HostUnavailable(Exception):
    """No warm host answers (not started yet, still importing, or gone): start the server directly."""


def socket_path(runtime_dir: str | Path) -> Path:
    """The host's control socket: one per interpreter and provider source version."""
    here = Path(__file__).resolve().parent
    stamp = [sys.executable, str(here)]
    for name in ("warm_host.py", "mlflow_server.py", "fast_path.py"):
        with contextlib.suppress(OSError):
            stamp.append(str((here / name).stat().st_mtime_ns))
    key = hashlib.sha256("\0".join(stamp).encode()).hexdigest()[:16]
    return Path(runtime_dir) / f"warm-host-{key}.sock"


def spawn(
    runtime_dir: str | Path, argv: list[str], env: dict[str, str], cwd: str, fds: list[int], timeout: float = 10.0
) -> int:
    """Ask the warm host to fork a model server; its pid.

    :param argv: the server's command line (``python -m ...mlflow_server --service-uuid ...``); it
        becomes the process title. ``{fd0}``, ``{fd1}``... in it are replaced by the numbers the
        passed file descriptors get in the server.
    :param env: the server's whole environment.
    :param cwd: the server's working directory.
    :param fds: file descriptors for the server; the first two become its stdout and stderr (the
        log), the others are passed on (the listening socket).
    """
    path = socket_path(runtime_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise HostUnavailable(str(exc)) from None
        request = json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode() + b"\n"
        try:
            socket.send_fds(sock, [request], fds)
            buf = b""
            while not buf.endswith(b"\n"):
                data = sock.recv(65536)
                if not data:
                    raise HostUnavailable("the warm host closed the connection")
                buf += data
        except OSError as exc:
            raise HostUnavailable(str(exc)) from None
    answer = json.loads(buf)
    if not answer.get("ok"):
        raise HostUnavailable(answer.get("error", "the warm host refused"))
    return int(answer["pid"])


def start(runtime_dir: str | Path, log_path: str | Path, env: dict[str, str], idle_timeout: float) -> None:
    """Start a warm host in the background (its own session; returns at once, without waiting)."""
    cmd = [sys.executable, "-m", HOST_MODULE, "--runtime-dir", str(runtime_dir), "--idle-timeout", str(idle_timeout)]
    # Room in the host's argument area for the command lines of the servers it forks (see _set_cmdline).
    cmd.append(f"--cmdline-room={'.' * CMDLINE_ROOM}")
    # The host's own environment carries no credentials (the deployer strips them): each server gets
    # its own, and room for it in the environment area that /proc/<pid>/environ shows.
    env = {**env, _ENV_ROOM_VAR: "." * ENV_ROOM}
    with open(log_path, "ab") as log:
        subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
            cwd="/",
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The host process.
# ---------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [warm-host pid={os.getpid()}] {msg}", file=sys.stderr, flush=True)


def _recv_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    buf, fds = b"", []
    while not buf.endswith(b"\n"):
        data, got, _flags, _addr = socket.recv_fds(conn, 1 << 20, 16)
        fds.extend(got)
        if not data:
            break
        buf += data
    return json.loads(buf), fds


def _stat_fields() -> list[str]:
    return Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()  # fields from the 3rd on


def _cmdline_area() -> tuple[int, int]:
    """Start and end address of this process's argument area (/proc/self/stat fields 48 and 49)."""
    fields = _stat_fields()
    return int(fields[45]), int(fields[46])


def _environ_area() -> tuple[int, int]:
    """Start and end address of this process's initial environment (/proc/self/stat fields 50, 51)."""
    fields = _stat_fields()
    return int(fields[47]), int(fields[48])


def _encoded_environ(env: dict[str, str]) -> bytes:
    return b"".join(f"{key}={value}".encode() + b"\0" for key, value in env.items())


def _set_environ(env: dict[str, str]) -> None:
    """Make /proc/<pid>/environ read ``env`` (the server's whole environment, as if exec'd with it).

    os.environ was replaced before: libc's environ no longer points into this area, so it is free.
    """
    import ctypes

    start, end = _environ_area()
    data = _encoded_environ(env)
    if len(data) > end - start:
        raise ValueError(f"the environment needs {len(data)} bytes, the host has room for {end - start}")
    ctypes.memmove(start, data.ljust(end - start, b"\0"), end - start)


def _encoded_cmdline(argv: list[str]) -> bytes:
    return b"\0".join(arg.encode() for arg in argv) + b"\0"


def _set_cmdline(argv: list[str]) -> None:
    """Make /proc/<pid>/cmdline read ``argv``, NUL-separated like an exec'd process's (so tools such
    as psutil see the same list of arguments), by rewriting the argument area in place."""
    import ctypes

    start, end = _cmdline_area()
    data = _encoded_cmdline(argv)
    if len(data) > end - start:
        raise ValueError(f"the command line needs {len(data)} bytes, the host has room for {end - start}")
    ctypes.memmove(start, data.ljust(end - start, b"\0"), end - start)


def _become_server(request: dict[str, Any], fds: list[int]) -> None:
    """In the forked server: take the deployer's environment, log, socket and command line; run."""
    argv: list[str] = request["argv"]
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    passed = {}
    for index, fd in enumerate(fds):
        if index >= 2:
            os.set_inheritable(fd, True)
        passed[f"{{fd{index}}}"] = str(fd)
    argv = [passed.get(arg, arg) for arg in argv]
    for fd in fds[:2]:
        if fd not in (1, 2):
            os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    _set_environ(request["env"])
    os.chdir(request["cwd"])
    # The command line is what identifies a server (pid + command line, like one started by exec).
    _set_cmdline(argv)
    from airflow_provider_modeldeploy.serving import mlflow_server

    code = 1
    try:
        code = mlflow_server.main(argv[argv.index(mlflow_server.SERVER_MODULE) + 1 :])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _fork_server(request: dict[str, Any], fds: list[int], keep: list[Any]) -> int:
    """Double fork: the server is not the host's child, and is in its own session."""
    pid_r, pid_w = os.pipe()
    first = os.fork()
    if first == 0:
        code = 1
        try:
            os.close(pid_r)
            for obj in keep:
                with contextlib.suppress(Exception):
                    obj.close()
            os.setsid()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
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


def _preload() -> None:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a missing optional library must not keep the host from serving
            _log(f"could not preload {name}: {type(exc).__name__}: {exc}")
    # Loading a model checks its requirements against the installed distributions; the map of
    # modules to distributions is built once per process (a scan of every installed package).
    try:
        from mlflow.utils import requirements_utils

        requirements_utils._init_packages_to_modules_map()
    except Exception as exc:
        _log(f"could not preload the package map: {type(exc).__name__}: {exc}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog=HOST_MODULE, description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--idle-timeout", type=float, default=600)
    parser.add_argument("--cmdline-room", default="", help="padding: room for the servers' command lines")
    args = parser.parse_args(argv)

    path = socket_path(args.runtime_dir)
    os.environ.pop(_ENV_ROOM_VAR, None)
    _preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(OSError), probe:
        probe.connect(str(path))
        _log("another warm host already serves this socket; exiting")
        return 0
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old_umask = os.umask(0o077)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(64)
    inode = path.stat().st_ino
    _log(f"ready at {path} (idle timeout {args.idle_timeout:.0f}s)")

    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    last = time.monotonic()
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    try:
        while not stop:
            events = sel.select(timeout=min(5.0, args.idle_timeout))
            try:
                if path.stat().st_ino != inode:
                    _log("the socket was replaced; exiting")
                    return 0
            except FileNotFoundError:
                _log("the socket was removed; exiting")
                return 0
            if not events:
                if time.monotonic() - last > args.idle_timeout:
                    _log("idle; exiting")
                    return 0
                continue
            conn, _ = listener.accept()
            last = time.monotonic()
            with conn:
                fds: list[int] = []
                try:
                    conn.settimeout(10)
                    request, fds = _recv_request(conn)
                    if len(fds) < 2:
                        raise ValueError("a log file descriptor is required")
                    start, end = _cmdline_area()
                    if len(_encoded_cmdline(request["argv"])) > end - start:
                        raise ValueError("the command line is too long for the host's argument area")
                    start, end = _environ_area()
                    if len(_encoded_environ(request["env"])) > end - start:
                        raise ValueError("the environment is too large for the host's environment area")
                    pid = _fork_server(request, fds, [listener, conn, sel])
                    answer: dict[str, Any] = {"ok": True, "pid": pid}
                    _log(f"forked server {pid}")
                except Exception as exc:
                    answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                    _log(f"request failed: {answer['error']}")
                finally:
                    for fd in fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(answer).encode() + b"\n")
    finally:
        with contextlib.suppress(FileNotFoundError, OSError):
            if path.stat().st_ino == inode:
                path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
