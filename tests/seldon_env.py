"""Starting and stopping the Kubernetes API emulator for the Seldon tests (see ``k8s_emulator``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

TESTS = Path(__file__).resolve().parent


@dataclass
class Emulator:
    url: str
    kubeconfig: Path
    proc: subprocess.Popen
    workdir: Path

    def conn_json(self, **extra: object) -> str:
        """An ``AIRFLOW_CONN_*`` value for a ``modeldeploy_seldon`` connection to this emulator."""
        return json.dumps({
            "conn_type": "modeldeploy_seldon",
            "extra": {"kube_config_path": str(self.kubeconfig), "namespace": "models",
                      "ingress_base_url": self.url, **extra},
        })  # fmt: skip

    def inject_conflicts(self, count: int) -> None:
        httpx.post(f"{self.url}/emulator/conflicts", json={"count": count}, timeout=10).raise_for_status()


@contextlib.contextmanager
def run_emulator(workdir: Path) -> Iterator[Emulator]:
    """The emulator in a subprocess (its own session, stopped by pid with its model servers)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "port"
    log = (workdir / "emulator.log").open("ab")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "_AIRFLOW"))}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-m", "k8s_emulator.server", "--workdir", str(workdir), "--port-file", str(port_file)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(workdir), env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert proc.poll() is None, (workdir / "emulator.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the emulator did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port_file.read_text()}"
        kubeconfig = workdir / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": url}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester", "namespace": "models"}}],
            "users": [{"name": "tester", "user": {"token": "emulator-token-not-secret"}}],
        }))  # fmt: skip
        yield Emulator(url, kubeconfig, proc, workdir)
    finally:
        # SIGTERM: the emulator stops its model servers itself; then make sure of its whole group.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()
