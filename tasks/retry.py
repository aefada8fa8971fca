"""Which failures a retry can heal: one predicate for every I/O task.

    @task(**IO_RETRIES)              # retries=2, backoff with jitter, retry_condition_fn below
    def register(...): ...

Healable: the network and servers having a bad moment (connection refused or reset,
timeouts, HTTP 5xx and 429, S3 throttling, a locked SQLite file). Not healable: the request
itself is wrong (MLflow's INVALID_PARAMETER_VALUE, RESOURCE_ALREADY_EXISTS, PERMISSION_DENIED,
...; S3's AccessDenied, NoSuchBucket), any `MetaloopError` (bad params or data), and anything
else, which is a bug: retrying a bug only delays its message.
"""

from __future__ import annotations

from prefect.tasks import exponential_backoff

from metaloop.errors import MetaloopError

# MLflow error codes that say the request is wrong; the same request fails the same way.
MLFLOW_FINAL = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
                "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED", "ENDPOINT_NOT_FOUND",
                "MALFORMED_REQUEST", "INVALID_REQUEST", "NOT_FOUND", "FEATURE_DISABLED", "CUSTOMER_UNAUTHORIZED"}
MLFLOW_TRANSIENT = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED",
                    "IO_ERROR", "ABORTED"}
S3_TRANSIENT = {"Throttling", "ThrottlingException", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed",
                "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}


def healable(err: BaseException | None) -> bool:
    """True when the same call may succeed later; follows `raise ... from` causes."""
    seen = 0
    while err is not None and seen < 8:
        seen += 1
        if isinstance(err, MetaloopError) and not isinstance(err, OSError):
            return False
        verdict = _verdict(err)
        if verdict is not None:
            return verdict
        err = err.__cause__ or err.__context__
    return False


def _verdict(err: BaseException) -> bool | None:
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        code = getattr(err, "error_code", "")
        status = err.get_http_status_code() if hasattr(err, "get_http_status_code") else None
        if code in MLFLOW_TRANSIENT:
            return True
        if code in MLFLOW_FINAL:
            return False
        if status == 429 or (status and status >= 500):
            return True
        if "database is locked" in str(err) or "Max retries exceeded" in str(err):
            return True
        return None  # look at the cause (an MlflowException often wraps the real error)
    name = type(err).__name__
    if name == "ClientError":  # botocore: the service answered with an error code
        code = str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))
        return code in S3_TRANSIENT
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError"):
        return True
    if name == "OperationalError" and "locked" in str(err):  # sqlite under concurrent writers
        return True
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    if name in ("ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout", "ChunkedEncodingError"):
        return True  # requests' own classes (not all subclass the builtins)
    if type(err) is OSError:
        return True  # a plain OSError this project raises for I/O (e.g. `dvc push failed`)
    return None


def retry_condition(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry only a healable failure."""
    try:
        state.result()
    except BaseException as err:  # noqa: BLE001 - classify whatever the task raised
        return healable(err)
    return False


IO_RETRIES = dict(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
                  retry_condition_fn=retry_condition)
