"""The tests' ``airflow`` commands forked from a preloaded interpreter (cli_forker.py) answer as the
same commands exec'd do: exit code, stdout, stderr's error line; a timeout kills the command."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from cli_forker import BIN, Forker
from conftest import airflow_env, wait_for


@pytest.fixture(scope="module")
def forker() -> Iterator[Forker]:
    forker = Forker()
    yield forker
    forker.close()


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("airflow", ["served-models", "list", "-o", "json"]),
        ("airflow", ["served-models", "describe", "no-such-uuid"]),  # exits 1 with one error line
        ("airflow", ["served-models", "list", "--limit", "-1"]),  # argparse: exits 2
        ("mlflow", ["deployments", "help", "-t", "modeldeploy"]),  # the provider's plugin, from MLflow's CLI
    ],
)
def test_forked_commands_answer_as_exec_d_ones(forker: Forker, script: str, args: list[str], tmp_path: Path) -> None:
    env = airflow_env(tmp_path / "airflow")
    assert forker.serves(env)
    forked = forker.run(args, env, timeout=120, script=BIN / script)
    exec_d = subprocess.run(
        [str(BIN / script), *args], capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL
    )
    assert forked.returncode == exec_d.returncode, (forked.stderr[-2000:], exec_d.stderr[-2000:])
    assert forked.stdout == exec_d.stdout
    assert forked.stderr.strip().splitlines()[-1:] == exec_d.stderr.strip().splitlines()[-1:]
    assert "Traceback" not in forked.stderr


def test_python_code_runs_as_python_c_does(forker: Forker, tmp_path: Path) -> None:
    """``run_python``'s mode: the code sees what ``python -c`` gives it (argv, ``__main__``, the
    environment, the working directory) and exits with its code; an uncaught error prints a traceback."""
    env = {**airflow_env(tmp_path / "airflow"), "RACER_SAYS": "hello"}
    code = (
        "import os, sys\n"
        "print(sys.argv, __name__, __file__ if '__file__' in globals() else None, os.environ['RACER_SAYS'])\n"
        "print(os.getcwd(), sys.modules['__main__'].__dict__ is globals())\n"
        "if sys.argv[1] == 'fail': raise ValueError('the racer failed')\n"
        "sys.exit(int(sys.argv[1]))\n"
    )
    for args in (["0", "x y"], ["3"], ["fail"]):
        forked = forker.run(args, env, timeout=60, code=code)
        exec_d = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=60,
            stdin=subprocess.DEVNULL, cwd=os.getcwd(),
        )  # fmt: skip
        assert (forked.returncode, forked.stdout) == (exec_d.returncode, exec_d.stdout), (forked, exec_d)
        assert forked.stderr.strip().splitlines()[-1:] == exec_d.stderr.strip().splitlines()[-1:]
    assert "ValueError: the racer failed" in forked.stderr and forked.returncode == 1


def test_a_timeout_kills_the_command(forker: Forker, tmp_path: Path) -> None:
    env = airflow_env(tmp_path / "airflow")
    (tmp_path / "empty.db").touch()  # `db check-migrations` waits for migrations that never come
    env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{tmp_path / 'empty.db'}"
    server = psutil.Process(forker.proc.pid)
    with pytest.raises(subprocess.TimeoutExpired):
        forker.run(["db", "check-migrations", "-t", "600"], env, timeout=2)

    def running() -> list[psutil.Process]:
        return [p for p in server.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]

    wait_for(lambda: not running(), 15, "the command and its monitor to end", lambda: running())


def test_an_interpreter_set_up_differently_is_not_served(forker: Forker, tmp_path: Path) -> None:
    env = airflow_env(tmp_path / "airflow")
    assert not forker.serves({**env, "PYTHONPATH": os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])})
    assert not forker.serves({**env, "PYTHONHASHSEED": "1"})
