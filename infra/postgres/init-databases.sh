#!/bin/sh
# Runs once, when the postgres volume is empty (docker-entrypoint-initdb.d): one database per
# service besides POSTGRES_DB (mlflow). METALOOP_EXTRA_DATABASES: space-separated names.
set -eu
for db in ${METALOOP_EXTRA_DATABASES:-prefect mlflow_auth}; do
    echo "creating database $db"
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
        -c "CREATE DATABASE \"$db\" OWNER \"$POSTGRES_USER\""
done
