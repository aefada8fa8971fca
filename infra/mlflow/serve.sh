#!/bin/sh
# Entry point of the metaloop-mlflow image: `mlflow server "$@"`, with basic auth on request.
#
#   MLFLOW_BASIC_AUTH=true        add --app-name basic-auth; needs MLFLOW_AUTH_DATABASE_URI,
#                                 MLFLOW_AUTH_ADMIN_PASSWORD and MLFLOW_FLASK_SERVER_SECRET_KEY
#   MLFLOW_AUTH_ADMIN_USERNAME    the admin created on first start (default admin)
#   MLFLOW_AUTH_DEFAULT_PERMISSION  READ (default), EDIT, MANAGE or NO_PERMISSIONS
#
# MLflow's auth settings live in an .ini file (MLFLOW_AUTH_CONFIG_PATH); it is written here
# from the environment so that no password sits in the image or in git. The admin password
# is read by MLflow from MLFLOW_AUTH_ADMIN_PASSWORD, never written to the file.
set -eu

if [ "${MLFLOW_BASIC_AUTH:-false}" = "true" ]; then
    : "${MLFLOW_AUTH_DATABASE_URI:?MLFLOW_BASIC_AUTH=true needs MLFLOW_AUTH_DATABASE_URI}"
    : "${MLFLOW_AUTH_ADMIN_PASSWORD:?MLFLOW_BASIC_AUTH=true needs MLFLOW_AUTH_ADMIN_PASSWORD}"
    : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?MLFLOW_BASIC_AUTH=true needs MLFLOW_FLASK_SERVER_SECRET_KEY}"
    config="${MLFLOW_AUTH_CONFIG_PATH:-${TMPDIR:-/tmp}/mlflow-basic-auth.ini}"
    umask 077
    cat > "$config" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
    export MLFLOW_AUTH_CONFIG_PATH="$config"
    set -- "$@" --app-name basic-auth
fi

exec mlflow server "$@"
