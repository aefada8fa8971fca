#!/bin/sh
# Entry point of the metaloop worker/trainer image (infra/Dockerfile); also usable on a laptop:
#
#     METALOOP_DVC_REMOTE_URL=s3://metaloop/dvc AWS_ENDPOINT_URL=http://localhost:9000 \
#         infra/entrypoint.sh metaloop run
#
# DVC has no environment variable for a remote, so this turns the environment into DVC's
# git-ignored local config (.dvc/config.local) and then runs the command. Credentials are
# never written: dvc-s3 reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment.
#
#   METALOOP_DVC_REMOTE_URL   s3://bucket/prefix (or any DVC remote URL); unset: keep .dvc/config's remote
#   METALOOP_DVC_REMOTE_NAME  the remote's name in .dvc/config.local (default: storage)
#   AWS_ENDPOINT_URL          S3-compatible endpoint (MinIO, RustFS, moto); unset: AWS itself
set -eu

if [ -n "${METALOOP_DVC_REMOTE_URL:-}" ]; then
    if [ ! -d .dvc ]; then
        echo "entrypoint: METALOOP_DVC_REMOTE_URL is set but $(pwd) has no .dvc folder" >&2
        exit 2
    fi
    name="${METALOOP_DVC_REMOTE_NAME:-storage}"
    dvc remote add --local --force --default "$name" "$METALOOP_DVC_REMOTE_URL" >/dev/null
    if [ -n "${AWS_ENDPOINT_URL:-}" ]; then
        dvc remote modify --local "$name" endpointurl "$AWS_ENDPOINT_URL"
    fi
    echo "entrypoint: DVC remote '$name' -> $METALOOP_DVC_REMOTE_URL${AWS_ENDPOINT_URL:+ at $AWS_ENDPOINT_URL}" >&2
fi

# Without a git checkout (the image ships the project, not its .git) DVC needs no_scm.
if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1 && [ -d .dvc ]; then
    dvc config --local core.no_scm true
fi

if [ "$#" -eq 0 ]; then
    set -- metaloop --help
fi
exec "$@"
