#!/usr/bin/env bash
# The team's MLflow tracking server: runs, params and metrics in a database, artifacts (models,
# plots) stored behind the server, so clients need no storage credentials.
#
#   MLFLOW_BACKEND_STORE_URI      postgresql://mlflow:PASSWORD@postgres:5432/mlflow  (pip install psycopg2-binary)
#                                 or sqlite:////srv/mlflow/mlflow.db on one machine
#   MLFLOW_ARTIFACTS_DESTINATION  s3://bucket/mlflow (pip install boto3) or a local/shared folder
#   MLFLOW_HOST, MLFLOW_PORT      where it listens (127.0.0.1, 5000): loopback only by default
#   MLFLOW_WORKERS                server worker processes (4)
#   MLFLOW_ALLOWED_HOSTS          Host headers it answers besides localhost and private IPs,
#                                 e.g. mlflow.mmctr.svc.cluster.local,mlflow.example.com
#   MLFLOW_AUTH                   who checks users when it listens beyond loopback:
#     basic-auth  MLflow's own login (users, passwords, per-experiment permissions), served as
#                 `mlflow server --app-name basic-auth`. Needs `pip install "mlflow[auth]==3.17.*"`,
#                 MLFLOW_FLASK_SERVER_SECRET_KEY (the same on every replica) and, on the first
#                 start, MLFLOW_AUTH_ADMIN_PASSWORD (12+ characters; MLflow 3.17 ships no default).
#                 Users live in MLFLOW_AUTH_CONFIG_PATH's `database_uri` (an .ini like mlflow's
#                 server/auth/basic_auth.ini; point it at Postgres, not a relative sqlite file).
#                 Clients set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.
#     proxy       a reverse proxy in front authenticates every request (nginx/Traefik basic auth
#                 or OAuth2 proxy, a Kubernetes ingress with auth); the server itself does not.
#                 Make sure only the proxy can reach MLFLOW_PORT.
#   The server has no authentication of its own, so it refuses to listen on anything but
#   loopback (127.0.0.1, ::1, localhost) unless MLFLOW_AUTH says who authenticates.
#
# Then point the pipeline at it: MLFLOW_TRACKING_URI=http://<host>:<port> (README.md, MLflow).
set -euo pipefail
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI to the tracking database, e.g. postgresql://mlflow:PASSWORD@postgres:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION to where artifacts go, e.g. s3://bucket/mlflow}"
host="${MLFLOW_HOST:-127.0.0.1}"
auth="${MLFLOW_AUTH:-}"
args=(
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
  --serve-artifacts
  --host "$host"
  --port "${MLFLOW_PORT:-5000}"
  --workers "${MLFLOW_WORKERS:-4}"
)
case "$auth" in
  "") case "$host" in
        127.0.0.1|::1|localhost) ;;
        *) echo "mlflow-server.sh: MLFLOW_HOST=$host would serve every run, model and artifact without authentication." \
                "Set MLFLOW_AUTH=basic-auth (MLflow's login) or MLFLOW_AUTH=proxy (an authenticating reverse proxy in front)," \
                "or leave MLFLOW_HOST unset to listen on 127.0.0.1 only (see the header of $0)." >&2
           exit 2 ;;
      esac ;;
  basic-auth)
    : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?MLFLOW_AUTH=basic-auth needs MLFLOW_FLASK_SERVER_SECRET_KEY (a random secret, the same on every replica)}"
    args+=(--app-name basic-auth) ;;
  proxy) ;;
  *) echo "mlflow-server.sh: MLFLOW_AUTH=$auth is not one of basic-auth, proxy (or unset: loopback only)" >&2
     exit 2 ;;
esac
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
exec mlflow server "${args[@]}"
