"""Fixtures shared by every test folder; helpers live in tests/support.py."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from support import BIN, free_port  # noqa: F401  (also sets the offline environment)


@pytest.fixture(scope="session")
def moto_s3():
    """A real S3 endpoint on 127.0.0.1 served by moto_server; yields its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(moto_s3):
    import uuid

    import boto3

    name = f"bucket-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=moto_s3)
    client.create_bucket(Bucket=name)
    return client, name


@pytest.fixture
def mlflow_sqlite(tmp_path, monkeypatch):
    """A real MLflow tracking + registry store in a SQLite file under tmp_path."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
