#!/bin/sh
# Serve one domain's registered model over REST (MLflow's scoring server: /ping, /invocations).
# The alias is resolved when the server starts, so a restart follows a promotion or a rollback:
#   docker compose -f infra/docker-compose.yml --profile serving restart serving
set -eu
: "${METALOOP_SERVE_DOMAIN:?set METALOOP_SERVE_DOMAIN to the target domain to serve (infra/.env)}"
MODEL="models:/${METALOOP_REGISTRY_PREFIX:-metaloop}-${METALOOP_SERVE_DOMAIN}@${METALOOP_SERVE_ALIAS:-champion}"
echo "serving ${MODEL} from ${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI}"
# --env-manager local: this image already holds what an int8 (ONNX) version's requirements.txt
# lists; for a torch recipe use `mlflow models build-docker` instead (docs/serving.md).
exec mlflow models serve -m "${MODEL}" --env-manager local -h 0.0.0.0 -p "${PORT:-8080}" \
  --workers "${METALOOP_SERVE_WORKERS:-1}" "$@"
