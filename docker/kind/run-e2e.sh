#!/usr/bin/env bash
# Run the Seldon end-to-end tests against a REAL kind cluster with Seldon Core 1.19 and Istio,
# instead of the Kubernetes API emulator. Needs docker, kind, kubectl, helm and istioctl, and
# network access to the container registries: it cannot run on the project's CI machines.
#
#   docker/kind/run-e2e.sh            # create the cluster, install, run tests/test_seldon.py
#   KEEP_CLUSTER=1 docker/kind/run-e2e.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cluster="${CLUSTER_NAME:-modeldeploy-e2e}"

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

# The tests read these instead of starting the emulator (tests/seldon_env.py): the real cluster's
# kubeconfig, the ingress, and MLflow artifacts stored in the cluster's MinIO.
export MODELDEPLOY_E2E_KUBECONFIG="$kubeconfig"
export MODELDEPLOY_E2E_INGRESS="http://127.0.0.1:8080"
export MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:30900" AWS_ACCESS_KEY_ID=minioadmin AWS_SECRET_ACCESS_KEY=minioadmin
cd "$root"
.venv/bin/python -m pytest tests/test_seldon.py -v
