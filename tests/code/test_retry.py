"""The one retry predicate (tasks/retry.py) against real MLflow, S3 and network errors."""

from __future__ import annotations

import http.server
import threading

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from support import free_port
from metaloop.errors import ConfigError, DataError
from tasks.registry import ArtifactUploadFailed
from tasks.retry import healable


def raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as err:  # noqa: BLE001
        return err
    raise AssertionError("did not raise")


def test_requests_mlflow_refuses_are_final(mlflow_sqlite):
    c = MlflowClient()
    c.create_registered_model("m")
    exists = raised(lambda: c.create_registered_model("m"))
    assert isinstance(exists, MlflowException) and exists.error_code == "RESOURCE_ALREADY_EXISTS"
    bad_name = raised(lambda: c.create_registered_model(""))
    missing = raised(lambda: c.get_model_version("nope", "1"))
    bad_alias = raised(lambda: c.set_registered_model_alias("m", "v1", "1"))  # 'v1' is a reserved alias form
    for err in (exists, bad_name, missing, bad_alias):
        assert isinstance(err, MlflowException) and not healable(err), (err.error_code, err)


def test_user_errors_and_bugs_are_final():
    assert not healable(ConfigError("params.yaml: bad"))
    assert not healable(DataError("x.csv:3: bad row"))
    assert not healable(KeyError("a bug"))
    assert not healable(TypeError("a bug"))


def test_a_server_that_is_down_or_failing_heals(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    refused = raised(lambda: MlflowClient(f"http://127.0.0.1:{free_port()}").search_experiments())
    assert healable(refused), refused

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(503)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        unavailable = raised(lambda: MlflowClient(f"http://127.0.0.1:{server.server_port}").search_experiments())
    finally:
        server.shutdown()
    assert healable(unavailable), unavailable


@pytest.mark.parametrize("code, heals", [("SlowDown", True), ("Throttling", True), ("InternalError", True),
                                         ("AccessDenied", False), ("NoSuchBucket", False)])
def test_s3_answers(code, heals):
    from botocore.exceptions import ClientError

    err = ClientError({"Error": {"Code": code, "Message": "m"}}, "PutObject")
    assert healable(err) is heals
    # wrapped as the registry wraps a failed upload: the cause decides
    try:
        raise ArtifactUploadFailed("could not upload") from err
    except ArtifactUploadFailed as wrapped:
        assert healable(wrapped) is heals


def test_s3_endpoint_down_heals(moto_s3):
    import boto3

    c = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{free_port()}", config=__import__("botocore").config.Config(
        retries={"max_attempts": 0}, connect_timeout=2))
    assert healable(raised(lambda: c.list_buckets()))
