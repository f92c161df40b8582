"""Run ``airflow`` (and ``mlflow``) commands forked from an interpreter that has already imported
Airflow's libraries.

The suite runs a hundred-odd one-shot ``airflow`` commands; each spent some 1.3 s of its 2 s start-up
importing third-party libraries (SQLAlchemy, pydantic, pendulum, libcst, rich, FastAPI, Cadwyn...) on a
CPU-bound machine. The fork server here imports those once (never Airflow itself, nor the provider,
nor MLflow: they read AIRFLOW_HOME and the configuration when imported, and are imported in each
command as in a new process). A command is the installed console script (``airflow``, ``mlflow``), or
the code of a ``python -c`` (``run_python``: the tests' racing deployers...), run as ``__main__`` in a
forked child with the caller's arguments, environment, working directory and stdio, exiting as the
interpreter does (non-daemon threads joined, ``atexit`` handlers run, streams flushed).

A command whose interpreter would start differently (a ``PYTHON*`` variable unlike the fork server's,
other than ``PYTHONUNBUFFERED``, which the child applies) is exec'd as usual, as is every command when
``MODELDEPLOY_TEST_FORK_CLI=0``. Long-running components (api-server, scheduler...) are always exec'd.
The multi-host tests start a fork server in each host that runs commands (``Forker(env, spawn)``): its
commands inherit that host's namespaces as an exec'd one does.

The server runs as ``python cli_forker.py --fd N`` and takes its own directory off ``sys.path``: nothing
of tests/ is importable, and ``sys.path`` is what the console script's would be. One per pytest process,
started on first use, gone when that process exits. Each command has its own connection: the server forks a monitor, which forks
the command, sends its pid, waits for it and sends its exit code.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

BIN = Path(sys.executable).parent
AIRFLOW = BIN / "airflow"
#: Variables read by the interpreter as it starts: a command whose values differ is exec'd.
STARTUP_VARS = (
    "PYTHONPATH", "PYTHONSAFEPATH", "PYTHONHOME", "PYTHONHASHSEED", "PYTHONWARNINGS", "PYTHONDONTWRITEBYTECODE",
    "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONDEVMODE", "PYTHONOPTIMIZE", "PYTHONNOUSERSITE", "PYTHONUSERBASE",
    "PYTHONSTARTUP", "PYTHONFAULTHANDLER", "PYTHONTRACEMALLOC", "PYTHONPLATLIBDIR", "PYTHONINTMAXSTRDIGITS",
    "LC_ALL", "LC_CTYPE", "LANG",
)  # fmt: skip
#: What ``airflow`` imports before any command runs, and what ``tasks test`` / ``dags test`` add (the
#: in-process Execution API). Third-party only: the server refuses to serve if any of them imported
#: Airflow, the provider or MLflow.
PRELOAD = (
    "sqlalchemy", "sqlalchemy.orm", "sqlalchemy.ext.asyncio", "sqlalchemy.dialects.sqlite", "sqlalchemy.dialects.postgresql",
    "pendulum", "pydantic", "pydantic_core", "pydantic_settings", "rich", "rich.console", "rich.table", "rich_argparse",
    "jinja2", "jinja2.sandbox", "fsspec", "upath", "yaml", "attrs", "structlog", "httpx", "jsonschema", "referencing",
    "cryptography.fernet", "psutil", "pathspec", "libcst", "opentelemetry", "opentelemetry.trace", "fastapi",
    "fastapi.routing", "starlette", "starlette.routing", "cadwyn", "uvicorn", "lazy_object_proxy", "methodtools",
    "argcomplete", "tabulate", "croniter", "cron_descriptor", "dateutil", "packaging", "msgspec", "itsdangerous",
    "tenacity", "uuid6", "jwt", "dill", "aiohttp", "aiosqlite", "anyio", "h11", "httpcore", "pygments",
    "werkzeug", "flask", "click", "email_validator", "python_multipart", "alembic", "alembic.runtime.migration",
    "asyncio", "concurrent.futures", "email", "http.client", "json", "logging.config", "multiprocessing", "ssl",
)  # fmt: skip


def _startup(env: dict[str, str]) -> tuple[str | None, ...]:
    return tuple(env.get(name) for name in STARTUP_VARS)


class NotStarted(Exception):
    """The fork server did not start the command (it may be exec'd instead)."""


Spawn = Callable[[list[str], dict[str, str], int], subprocess.Popen[Any]]


def _spawn_here(argv: list[str], env: dict[str, str], fd: int) -> subprocess.Popen[Any]:
    return subprocess.Popen(argv, pass_fds=(fd,), stdin=subprocess.DEVNULL, env=env, cwd="/")


class Forker:
    """A handle on a fork server: this process's, or (``env``, ``spawn``) one started elsewhere, e.g.
    in a multi-host test's host, whose commands then run in that host's namespaces."""

    def __init__(self, env: dict[str, str] | None = None, spawn: Spawn = _spawn_here) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if env is None:
            env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        self.startup = _startup(env)
        self.proc = spawn([sys.executable, __file__, "--fd", str(child.fileno())], env, child.fileno())
        child.close()
        self.listener = parent
        self.lock = threading.Lock()

    def serves(self, env: dict[str, str]) -> bool:
        return self.proc.poll() is None and _startup(env) == self.startup

    def close(self) -> None:
        """Stop the fork server (it ends when its listener closes)."""
        self.listener.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def run(
        self,
        args: list[str],
        env: dict[str, str],
        timeout: float,
        script: Path = AIRFLOW,
        code: str | None = None,
        cwd: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``script *args`` (or, given ``code``, ``python -c code *args``) as
        ``subprocess.run(..., capture_output=True, text=True, timeout=timeout, cwd=cwd)``."""
        argv = ["-c", *args] if code is not None else [str(script), *args]
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            fields = {"argv": argv, "code": code, "env": env, "cwd": cwd or os.getcwd()}
            request = json.dumps(fields).encode() + b"\n"
            try:
                with self.lock:  # a connection per command: its end goes to the server first
                    socket.send_fds(self.listener, [b"c"], [theirs.fileno()])
                socket.send_fds(mine, [request], [null, out_w, err_w])
            except OSError as exc:
                for fd in (out_r, err_r):
                    os.close(fd)
                mine.close()
                raise NotStarted(str(exc)) from None
        finally:
            for fd in (null, out_w, err_w):
                os.close(fd)
            theirs.close()
        output: dict[int, bytes] = {}

        def drain(fd: int) -> None:
            chunks = []
            while data := os.read(fd, 65536):
                chunks.append(data)
            output[fd] = b"".join(chunks)
            os.close(fd)

        readers = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in (out_r, err_r)]
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + timeout
        answers = mine.makefile("rb")
        try:
            started = json.loads(answers.readline() or b"{}")
            if "pid" not in started:  # the readers end as the server's copies of the pipes close
                raise NotStarted("the fork server is gone")
            mine.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                exit_code = json.loads(answers.readline() or b'{"code": null}')["code"]
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(started["pid"], 9)
                raise subprocess.TimeoutExpired(argv, timeout) from None
            for reader in readers:
                reader.join(max(0.1, deadline - time.monotonic()))
            if exit_code is None or any(reader.is_alive() for reader in readers):
                raise subprocess.TimeoutExpired(argv, timeout)
        finally:
            answers.close()
            mine.close()
        # As subprocess.run(text=True) reads them: decoded, universal newlines.
        text = {fd: data.decode().replace("\r\n", "\n").replace("\r", "\n") for fd, data in output.items()}
        return subprocess.CompletedProcess(argv, exit_code, text[out_r], text[err_r])


_forker: Forker | None = None
_forker_lock = threading.Lock()


def forking_enabled() -> bool:
    """Whether commands may be forked at all (``MODELDEPLOY_TEST_FORK_CLI=0``: every one is exec'd)."""
    return os.environ.get("MODELDEPLOY_TEST_FORK_CLI", "1") != "0"


def _serving(env: dict[str, str]) -> Forker | None:
    """This process's fork server (started on first use), if it may start a command with ``env``."""
    global _forker
    if not forking_enabled():
        return None
    with _forker_lock:
        if _forker is None:
            _forker = Forker()
    return _forker if _forker.serves(env) else None


def run_cli(
    args: list[str], env: dict[str, str], timeout: float, script: str = "airflow"
) -> subprocess.CompletedProcess[str]:
    """``airflow *args`` (or another console script of this environment) with ``env``: forked from
    this process's fork server where it can serve, else exec'd."""
    return _run(args, env, timeout, [str(BIN / script), *args], script=BIN / script)


def run_python(code: str, args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -c code *args`` with ``env``: forked from this process's fork server where it can
    serve, else exec'd."""
    return _run(args, env, timeout, [sys.executable, "-c", code, *args], code=code)


def _run(
    args: list[str], env: dict[str, str], timeout: float, exec_argv: list[str], **command: Any
) -> subprocess.CompletedProcess[str]:
    """``Forker.run(args, ..., **command)`` where the fork server serves ``env``, else ``exec_argv``."""
    forker = _serving(env)
    if forker is not None:
        with contextlib.suppress(NotStarted):
            return forker.run(args, env, timeout, **command)
    return subprocess.run(
        exec_argv, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL, check=False
    )


# -- in the fork server ----------------------------------------------------------------------------


def recv_line(sock: socket.socket, fds: list[int]) -> bytes:
    """One newline-ended message from ``sock``; the descriptors that came with it appended to ``fds``
    (the sender waits for an answer before it sends the next)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk, got, _flags, _addr = socket.recv_fds(sock, 1 << 20, 8)
        fds.extend(got)
        if not chunk:
            raise OSError("connection closed")
        data += chunk
    return data


def run_as_main(run: Callable[[], object]) -> NoReturn:
    """In a forked child set up as a new process would be: ``run()`` (the program's ``__main__``), then
    exit as the interpreter does (its exit code, non-daemon threads joined, ``atexit`` handlers run,
    streams flushed); a traceback for an uncaught exception. Never returns."""
    import atexit
    import traceback

    code = 1
    try:
        try:
            run()
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        with contextlib.suppress(BaseException):
            threading._shutdown()  # type: ignore[attr-defined]
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _command(request: dict[str, Any], fds: list[int]) -> NoReturn:
    """In the command's process: become the console script (``airflow <args>``), or ``python -c``."""
    import io
    import runpy

    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    code = request.get("code")
    if not sys.flags.safe_path:  # the interpreter puts a script's directory first (-c: the working one)
        sys.path.insert(0, "" if code is not None else os.path.dirname(request["argv"][0]))
    if os.environ.get("PYTHONUNBUFFERED"):
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    sys.argv = list(request["argv"])
    if code is not None:  # as `python -c` runs it: in a new __main__, named <string>
        main = type(sys)("__main__")
        sys.modules["__main__"] = main
        run_as_main(lambda: exec(compile(code, "<string>", "exec"), main.__dict__))
    run_as_main(lambda: runpy.run_path(request["argv"][0], run_name="__main__"))


def _monitor(conn: socket.socket) -> None:
    """In a monitor process: start one command, report its pid and then its exit code."""
    code = 1
    try:
        fds: list[int] = []
        request = json.loads(recv_line(conn, fds))
        pid = os.fork()
        if pid == 0:
            conn.close()
            _command(request, fds)
        for fd in fds:
            os.close(fd)
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        _, status = os.waitpid(pid, 0)
        conn.sendall(json.dumps({"code": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
        code = 0
    finally:
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import gc
    import importlib
    import warnings

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args(argv)
    listener = socket.socket(fileno=args.fd)
    if not sys.flags.safe_path:
        del sys.path[0]  # this script's directory (tests/integration): never the commands'
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        for name in PRELOAD:
            with contextlib.suppress(Exception):
                importlib.import_module(name)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("airflow", "airflow_provider_modeldeploy", "mlflow"))
    threads = len(os.listdir("/proc/self/task"))
    # Serve nothing if a preloaded library imported what each command must import itself, or warned as
    # it was imported (a command would not print that warning: the module is already imported), or
    # started a thread (forking a threaded process is unsafe).
    if leaked or warned or threads > 1:
        why = f"preloading imported {leaked[:5]}, warned {warned[:1]}, left {threads} threads"
        print(f"cli_forker: not serving: {why}", file=sys.stderr)
        return 1
    gc.collect()
    gc.freeze()
    listener.settimeout(1.0)
    while True:
        with contextlib.suppress(ChildProcessError):  # reap the monitors that are done
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        fds: list[int] = []
        try:
            data, got, _flags, _addr = socket.recv_fds(listener, 16, 4)
        except TimeoutError:
            continue
        fds.extend(got)
        if not data:
            return 0  # the pytest process is gone
        for fd in fds:
            conn = socket.socket(fileno=fd)
            if os.fork() == 0:
                listener.close()
                _monitor(conn)
            conn.close()


if __name__ == "__main__":
    sys.exit(main())
