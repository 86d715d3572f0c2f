#!/usr/bin/env bash
# `make serve`: a local Prefect server with its UI on http://127.0.0.1:4200, a `process` work pool, the
# deployments (manual, nightly, one per stage) and a worker. Open the UI, pick a deployment, click Run.
# Ctrl-C stops the worker and the server. PREFECT_HOME defaults to ./.prefect (the database lives there).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
POOL=${LEJEPA_WORK_POOL:-lejepa}
PORT=${PREFECT_PORT:-4200}
export PREFECT_HOME=${PREFECT_HOME:-$PWD/.prefect}
export PREFECT_API_URL="http://127.0.0.1:${PORT}/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false

"$VENV/bin/prefect" server start --host 127.0.0.1 --port "$PORT" &
server=$!
trap 'kill "$worker" 2>/dev/null || true; kill "$server" 2>/dev/null || true; wait' EXIT INT TERM
worker=
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:${PORT}/api/health" >/dev/null && break
    kill -0 "$server" 2>/dev/null || { echo "error: prefect server did not start (see above)" >&2; exit 1; }
    sleep 1
done
"$VENV/bin/prefect" work-pool inspect "$POOL" >/dev/null 2>&1 \
    || "$VENV/bin/prefect" work-pool create "$POOL" --type process
"$VENV/bin/lejepa-pipeline" deploy --work-pool "$POOL" ${LEJEPA_CONFIG:+--config "$LEJEPA_CONFIG"}
"$VENV/bin/prefect" worker start --pool "$POOL" --type process &
worker=$!
echo "UI: http://127.0.0.1:${PORT}  (deployments: lejepa-pipeline/manual, lejepa-pipeline/nightly, lejepa-<stage>/manual)"
wait "$worker"
