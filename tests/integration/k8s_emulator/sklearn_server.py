"""A stand-in for KServe's sklearn server (``kserve-sklearnserver``) in the emulated predictor pods.

It loads the model exactly as KServe's ``SKLearnModel.load`` does: the files at the top of the model
directory (what the storage initializer downloaded to ``/mnt/models``) ending in ``.joblib``,
``.pkl`` or ``.pickle``; none is ``ModelMissingError``, several is an error, the one is loaded with
``joblib.load``. So an MLflow 3 model directory (``model.skops``) fails here as on a cluster. It
answers KServe's REST routes: v1 ``/v1/models/<m>:predict`` (``{"instances": ...}`` ->
``{"predictions": ...}``), ``/v1/models/<m>``, and v2 ``/v2/models/<m>/infer|ready``,
``/v2/health/live|ready``, in the shapes KServe's python model server uses.

Run: ``python -m k8s_emulator.sklearn_server --model-dir D --model-name M --state-file F``; the state
file says ``{"phase": "ready", "port": N}`` or ``{"phase": "failed", "error": ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SUFFIXES = (".joblib", ".pkl", ".pickle")


class ModelMissingError(Exception):
    pass


def load(model_dir: Path) -> Any:
    import joblib

    files = [f for f in sorted(os.listdir(model_dir)) if (model_dir / f).is_file() and f.endswith(SUFFIXES)]
    if not files:
        raise ModelMissingError(
            f"kserve.errors.ModelMissingError: Model with extension {SUFFIXES} not found in {model_dir}"
        )
    if len(files) > 1:
        raise RuntimeError(f"More than one model file is detected, Only one is allowed within model_dir: {files}")
    return joblib.load(model_dir / files[0])


def _write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.rename(path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--state-file", required=True)
    args = parser.parse_args()
    state = Path(args.state_file)
    print(f"INFO:kserve:Loading model {args.model_name} from {args.model_dir}", flush=True)
    try:
        model = load(Path(args.model_dir))
    except Exception as exc:
        message = str(exc) if isinstance(exc, ModelMissingError) else f"{type(exc).__name__}: {exc}"
        print(f"ERROR:kserve:{message}", flush=True)
        _write_state(state, {"phase": "failed", "error": message})
        return 1
    import numpy as np

    name = args.model_name

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *a: Any) -> None:
            print(
                f'INFO:     127.0.0.1 - "{self.command} {self.path} HTTP/1.1" {a[1] if len(a) > 1 else ""}', flush=True
            )

        def _send(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path in ("/", "/v2/health/live", "/v2/health/ready"):
                return self._send(200, {"status": "alive"} if self.path == "/" else {"live": True, "ready": True})
            if self.path == f"/v1/models/{name}":
                return self._send(200, {"name": name, "ready": True})
            if self.path == f"/v2/models/{name}/ready":
                return self._send(200, {"name": name, "ready": True})
            if self.path == f"/v2/models/{name}":
                return self._send(200, {"name": name, "versions": None, "platform": "", "inputs": [], "outputs": []})
            if self.path.startswith(("/v1/models/", "/v2/models/")):
                return self._send(
                    404, {"error": f"Model with name {self.path.split('/')[3].split(':')[0]} does not exist."}
                )
            return self._send(404, {"detail": "Not Found"})

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw or b"null")
            except ValueError:
                return self._send(400, {"error": "Unrecognized request format: not JSON"})
            if self.path == f"/v1/models/{name}:predict":
                instances = body.get("instances") if isinstance(body, dict) else None
                if not isinstance(instances, list):
                    return self._send(400, {"error": 'Expected "instances" to be a list'})
                try:
                    result = model.predict(np.asarray(instances))
                except Exception as exc:
                    return self._send(500, {"error": f"{type(exc).__name__} : {exc}"})
                return self._send(200, {"predictions": result.tolist()})
            if self.path == f"/v2/models/{name}/infer":
                try:
                    tensor = body["inputs"][0]
                    data = np.asarray(tensor["data"]).reshape(tensor["shape"])
                except (KeyError, IndexError, TypeError, ValueError) as exc:
                    return self._send(400, {"error": f"Invalid input: {type(exc).__name__}: {exc}"})
                try:
                    result = model.predict(data)
                except Exception as exc:
                    return self._send(500, {"error": f"{type(exc).__name__} : {exc}"})
                datatype = "INT64" if result.dtype.kind in "iu" else "FP64" if result.dtype.kind == "f" else "BYTES"
                return self._send(200, {
                    "model_name": name, "model_version": None, "id": body.get("id") or str(uuid.uuid4()),
                    "parameters": None,
                    "outputs": [{"name": "output-0", "shape": list(result.shape), "datatype": datatype,
                                 "parameters": None, "data": result.tolist()}],
                })  # fmt: skip
            if self.path.startswith(("/v1/models/", "/v2/models/")):
                return self._send(404, {"error": "Model does not exist."})
            return self._send(404, {"detail": "Not Found"})

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    print(f"INFO:kserve:Registering model: {name}", flush=True)
    _write_state(state, {"phase": "ready", "port": httpd.server_address[1]})
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
