"""Print where a served model answers, one sample prediction, and how to manage it."""

from __future__ import annotations

import sys

import httpx
from sklearn.datasets import load_wine

from airflow_provider_modeldeploy.deployers import find_services


def main(model_name: str) -> int:
    services = find_services(model_name=model_name)
    running = [s for s in services if s.is_running]
    if not running:
        print(f"No running server for {model_name}; see 'airflow served-models list'.", file=sys.stderr)
        return 1
    service = running[0]
    X, _ = load_wine(return_X_y=True, as_frame=True)
    sample = X.head(2).to_dict(orient="split")
    body = {"dataframe_split": {"columns": sample["columns"], "data": sample["data"]}}
    answer = httpx.post(service.prediction_url, json=body, timeout=30)
    answer.raise_for_status()
    print()
    print(f"Served model : {model_name} version {service.record.model_version} (service {service.uuid})")
    print(f"Prediction URL: {service.prediction_url}")
    print(f"Sample prediction for 2 rows: {answer.json()['predictions']}")
    print()
    print("The model server keeps running. With this AIRFLOW_HOME set (and .venv/bin on PATH):")
    print("  airflow served-models list")
    print(f"  airflow served-models describe {service.uuid}")
    print(f"  airflow served-models logs {service.uuid} --tail 20")
    print(f"  airflow served-models delete {service.uuid} --yes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "wine-classifier"))
