#!/usr/bin/env bash
# Run the KServe end-to-end tests (tests/integration/test_kserve.py) against a REAL kind cluster with KServe
# v0.20.0 in Standard mode (Deployments + Services, no Knative), ingress-nginx and MinIO, instead of
# the Kubernetes API emulator. The provider acts as the ServiceAccount of modeldeploy-rbac.yaml, so
# the documented RBAC is what is tested. Needs docker, kind, kubectl and helm, and network access to
# the container registries: it cannot run on the project's CI machines and has not been run (see
# README.md); expect to fix details on its first run.
#
#   docker/kind/kserve-e2e.sh            # create the cluster, install, run tests/integration/test_kserve.py
#   KEEP_CLUSTER=1 docker/kind/kserve-e2e.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cluster="${CLUSTER_NAME:-modeldeploy-kserve-e2e}"
minio_user=modeldeploy-e2e minio_password=e2e-S3cret-never-shown  # as docker/kind/minio.yaml sets them

kind create cluster --name "$cluster" --config "$here/kind-config.yaml" --wait 120s
trap '[[ -n "${KEEP_CLUSTER:-}" ]] || kind delete cluster --name "$cluster"' EXIT
admin_kubeconfig="$(mktemp)"
kind get kubeconfig --name "$cluster" > "$admin_kubeconfig"
export KUBECONFIG="$admin_kubeconfig"

# KServe's webhooks need cert-manager; its Standard mode routes through a Kubernetes Ingress.
kubectl apply -f https://github.com/cert-manager/cert-manager/releases/download/v1.16.2/cert-manager.yaml
kubectl -n cert-manager rollout status deploy/cert-manager-webhook --timeout=300s
helm install ingress-nginx ingress-nginx --repo https://kubernetes.github.io/ingress-nginx \
  --namespace ingress-nginx --create-namespace --set controller.service.type=NodePort \
  --set controller.service.nodePorts.http=31080 --wait
# Path-based routes (/serving/<namespace>/<name>/...) on the ingress that answers on localhost:8080,
# the same URLs the emulator gives; the connection's url_template points there.
helm install kserve-crd oci://ghcr.io/kserve/charts/kserve-crd --version v0.20.0 \
  --namespace kserve --create-namespace --wait
helm install kserve oci://ghcr.io/kserve/charts/kserve --version v0.20.0 --namespace kserve \
  --set kserve.controller.deploymentMode=Standard \
  --set kserve.controller.gateway.ingressGateway.className=nginx \
  --set-string 'kserve.controller.gateway.pathTemplate=/serving/{{ .Namespace }}/{{ .Name }}' --wait

kubectl create namespace models
kubectl apply -f "$here/minio.yaml"
kubectl -n models rollout status deploy/minio --timeout=180s
kubectl apply -f "$here/modeldeploy-rbac.yaml"

# Storage credentials the KServe way for the tests' deployments (the secrets test makes its own from
# an Airflow connection, as the provider does): a Secret with the s3 annotations, listed by an account.
kubectl -n models apply -f - <<YAML
apiVersion: v1
kind: Secret
metadata:
  name: e2e-model-storage
  annotations:
    serving.kserve.io/s3-endpoint: minio.models.svc.cluster.local:9000
    serving.kserve.io/s3-usehttps: "0"
stringData: {AWS_ACCESS_KEY_ID: "$minio_user", AWS_SECRET_ACCESS_KEY: "$minio_password"}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: e2e-model-storage}
secrets: [{name: e2e-model-storage}]
YAML

# The provider's kubeconfig: the airflow-modeldeploy account's token, nothing more.
kubeconfig="$(mktemp)"
server="$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
ca="$(kubectl config view --minify --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')"
token="$(kubectl -n models create token airflow-modeldeploy --duration=4h)"
cat > "$kubeconfig" <<YAML
apiVersion: v1
kind: Config
current-context: modeldeploy
clusters: [{name: kind, cluster: {server: "$server", certificate-authority-data: "$ca"}}]
users: [{name: airflow-modeldeploy, user: {token: "$token"}}]
contexts: [{name: modeldeploy, context: {cluster: kind, user: airflow-modeldeploy, namespace: models}}]
YAML

export MODELDEPLOY_E2E_KUBECONFIG="$kubeconfig"
export MODELDEPLOY_E2E_NAMESPACE=models
export MODELDEPLOY_E2E_INGRESS="http://127.0.0.1:8080"
export MODELDEPLOY_E2E_KSERVE_URL_TEMPLATE="http://127.0.0.1:8080/serving/{namespace}/{name}"
export MODELDEPLOY_E2E_KSERVE_SERVICE_ACCOUNT=e2e-model-storage
export MODELDEPLOY_E2E_TIMEOUT=1200
export MODELDEPLOY_E2E_STORAGE_ENDPOINT=http://minio.models.svc.cluster.local:9000
export MODELDEPLOY_E2E_ARTIFACT_ROOT=s3://mlflow/e2e
export MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:30900"
export AWS_ACCESS_KEY_ID="$minio_user" AWS_SECRET_ACCESS_KEY="$minio_password"

cd "$root"
source scripts/setup.sh
.venv/bin/python -m uv pip install --quiet --python .venv/bin/python boto3  # MLflow's S3 artifact store
.venv/bin/python -c 'import boto3, os; boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"]).create_bucket(Bucket="mlflow")'
.venv/bin/python -m pytest tests/integration/test_kserve.py -v
