#!/usr/bin/env bash
# Run the Seldon end-to-end tests (tests/integration/test_seldon.py) against a REAL kind cluster with Seldon
# Core 1.19 and Istio, instead of the Kubernetes API emulator. Needs docker, kind, kubectl, helm and
# istioctl, and network access to the container registries: it cannot run on the project's CI
# machines, and has not been run (see README.md).
#
#   docker/kind/run-e2e.sh            # create the cluster, install, run tests/integration/test_seldon.py
#   KEEP_CLUSTER=1 docker/kind/run-e2e.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cluster="${CLUSTER_NAME:-modeldeploy-e2e}"
# MinIO's credentials, as docker/kind/minio.yaml sets them.
minio_user=modeldeploy-e2e minio_password=e2e-S3cret-never-shown

kind create cluster --name "$cluster" --config "$here/kind-config.yaml" --wait 120s
trap '[[ -n "${KEEP_CLUSTER:-}" ]] || kind delete cluster --name "$cluster"' EXIT
kubeconfig="$(mktemp)"
kind get kubeconfig --name "$cluster" > "$kubeconfig"
export KUBECONFIG="$kubeconfig"

istioctl install -y --set profile=demo \
  --set "components.ingressGateways[0].k8s.service.type=NodePort" \
  --set "components.ingressGateways[0].k8s.service.ports[1].nodePort=31080" \
  --set "components.ingressGateways[0].k8s.service.ports[1].port=80" \
  --set "components.ingressGateways[0].k8s.service.ports[1].targetPort=8080" \
  --set "components.ingressGateways[0].k8s.service.ports[1].name=http2"
kubectl apply -f "$here/seldon-gateway.yaml"
helm install seldon-core seldon-core-operator --repo https://storage.googleapis.com/seldon-charts \
  --version 1.19.0 --namespace seldon-system --create-namespace -f "$here/seldon-values.yaml" --wait
kubectl apply -f "$here/minio.yaml"
kubectl -n models rollout status deploy/minio --timeout=180s

# The storage Secret every test deployment names (the provider never deletes one it did not create):
# rclone variables for Seldon's storage initializer, MinIO as the model pods reach it.
kubectl -n models create secret generic e2e-model-storage \
  --from-literal=RCLONE_CONFIG_S3_TYPE=s3 --from-literal=RCLONE_CONFIG_S3_PROVIDER=Minio \
  --from-literal=RCLONE_CONFIG_S3_ENV_AUTH=false \
  --from-literal=RCLONE_CONFIG_S3_ACCESS_KEY_ID="$minio_user" \
  --from-literal=RCLONE_CONFIG_S3_SECRET_ACCESS_KEY="$minio_password" \
  --from-literal=RCLONE_CONFIG_S3_ENDPOINT=http://minio.models.svc.cluster.local:9000

# tests/integration/seldon_env.py reads these instead of starting the emulator: the cluster's kubeconfig,
# namespace and ingress, how long a rollout may take, the storage Secret and MinIO endpoint the
# model pods use. tests/integration/conftest.py stores the session's MLflow models under
# MODELDEPLOY_E2E_ARTIFACT_ROOT (MinIO, reached from here on localhost:30900).
export MODELDEPLOY_E2E_KUBECONFIG="$kubeconfig"
export MODELDEPLOY_E2E_NAMESPACE=models
export MODELDEPLOY_E2E_INGRESS="http://127.0.0.1:8080"
export MODELDEPLOY_E2E_TIMEOUT=1200
export MODELDEPLOY_E2E_STORAGE_SECRET=e2e-model-storage
export MODELDEPLOY_E2E_STORAGE_ENDPOINT=http://minio.models.svc.cluster.local:9000
export MODELDEPLOY_E2E_ARTIFACT_ROOT=s3://mlflow/e2e
export MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:30900"
export AWS_ACCESS_KEY_ID="$minio_user" AWS_SECRET_ACCESS_KEY="$minio_password"

cd "$root"
source scripts/setup.sh
.venv/bin/python -m uv pip install --quiet --python .venv/bin/python boto3  # MLflow's S3 artifact store
.venv/bin/python -c 'import boto3, os; boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"]).create_bucket(Bucket="mlflow")'
.venv/bin/python -m pytest tests/integration/test_seldon.py -v
