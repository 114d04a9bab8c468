#!/usr/bin/env bash
# The team's MLflow tracking server: runs, params and metrics in a database, artifacts (models,
# plots) stored behind the server, so clients need no storage credentials.
#
#   MLFLOW_BACKEND_STORE_URI      postgresql://mlflow:PASSWORD@postgres:5432/mlflow  (pip install psycopg2-binary)
#                                 or sqlite:////srv/mlflow/mlflow.db on one machine
#   MLFLOW_ARTIFACTS_DESTINATION  s3://bucket/mlflow (pip install boto3) or a local/shared folder
#   MLFLOW_HOST, MLFLOW_PORT      where it listens (0.0.0.0, 5000)
#   MLFLOW_WORKERS                server worker processes (4)
#   MLFLOW_ALLOWED_HOSTS          Host headers it answers besides localhost and private IPs,
#                                 e.g. mlflow.mmctr.svc.cluster.local,mlflow.example.com
#
# Then point the pipeline at it: MLFLOW_TRACKING_URI=http://<host>:<port> (README.md, MLflow).
set -euo pipefail
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI to the tracking database, e.g. postgresql://mlflow:PASSWORD@postgres:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION to where artifacts go, e.g. s3://bucket/mlflow}"
args=(
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
  --serve-artifacts
  --host "${MLFLOW_HOST:-0.0.0.0}"
  --port "${MLFLOW_PORT:-5000}"
  --workers "${MLFLOW_WORKERS:-4}"
)
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
exec mlflow server "${args[@]}"
