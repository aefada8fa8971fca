"""MLflow plumbing shared by the tasks: the client, runs with explicit ids, lineage tags.

Tasks never use MLflow's fluent `active_run`: it is thread-local and breaks under
Prefect's thread-pool task runner. Every call names its run id.

Tracking URI: MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` with artifacts in
./mlartifacts (the embedded default). A team server is an environment variable away.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Mapping

import yaml
from mlflow import MlflowClient

from metaloop.config import Params

DEFAULT_URI = "sqlite:///mlflow.db"
TAG = "metaloop."  # prefix of every tag this project writes


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


class SerializedClient:
    """An MlflowClient whose calls run one at a time.

    SQLite (the embedded default) allows one writer; parallel domain tasks logging at once
    can exceed its lock timeout ("database is locked") on a busy machine. Servers don't
    need this, so only SQLite URIs get it.
    """

    _lock = threading.RLock()  # one per process, outside the instance: Prefect hashes task inputs

    def __init__(self, inner: MlflowClient):
        self._inner = inner

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_inner":
            raise AttributeError(name)
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            with self._lock:
                return attr(*args, **kwargs)

        return call


def client() -> MlflowClient:
    uri = tracking_uri()
    c = MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    return SerializedClient(c) if uri.startswith("sqlite:") else c


def experiment_id(c: MlflowClient, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if c.tracking_uri.startswith("sqlite:"):
        # Local store: keep artifacts beside the database, not in a surprise ./mlruns.
        location = (Path.cwd() / "mlartifacts").as_uri()
    return c.create_experiment(name, artifact_location=location)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and any(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{name}.{i}.") if isinstance(item, Mapping) else {f"{name}.{i}": str(item)})
        else:
            out[name] = json.dumps(value) if isinstance(value, list) else str(value)
    return out


def params_hash(params: Params) -> str:
    return hashlib.sha256(json.dumps(params.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def git_commit(root: Path = Path(".")) -> str:
    """HEAD (+ "-dirty"); in an image without .git, METALOOP_GIT_COMMIT (set at build time)."""
    if os.environ.get("METALOOP_GIT_COMMIT"):
        return os.environ["METALOOP_GIT_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


_DVC_LOCK = threading.Lock()


def dvc(*args: str, cwd: Path = Path(".")) -> subprocess.CompletedProcess:
    """Run this venv's `dvc`, one process at a time: DVC holds a repository lock and a
    parallel call fails with "Unable to acquire lock"."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    with _DVC_LOCK:
        return subprocess.run([str(bin_dir / "dvc"), *args], cwd=cwd, capture_output=True, text=True, env=env,
                              check=False)


def dvc_data_hash(lock: Path = Path("dvc.lock")) -> str:
    """One hash over the md5s of every DVC stage output (what `dvc.lock` pins)."""
    if not lock.is_file():
        return "none"
    stages = yaml.safe_load(lock.read_text())["stages"]
    outs = sorted((o["path"], o["md5"]) for s in stages.values() for o in s.get("outs", []))
    return hashlib.sha256(json.dumps(outs).encode()).hexdigest()[:16]


def start_run(c: MlflowClient, exp_id: str, name: str, parent: str | None = None,
              tags: Mapping[str, str] | None = None) -> str:
    all_tags = dict(tags or {})
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    return c.create_run(exp_id, run_name=name, tags=all_tags).info.run_id


def log_params(c: MlflowClient, run_id: str, params: Params) -> None:
    from mlflow.entities import Param

    flat = flatten(params.model_dump(mode="json"))
    items = [Param(k, v[:6000]) for k, v in sorted(flat.items())]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(c: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def dvc_remote_url(root: Path = Path(".")) -> str:
    """The default DVC remote's location (absolute for a local folder), '' if none."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            return ""
        url = repo.config["remote"][name]["url"]
    if "://" not in url:
        url = str((Path(root) / ".dvc" / url).resolve()) if not Path(url).is_absolute() else url
    return url


def dvc_out_md5(stage: str, lock: Path = Path("dvc.lock")) -> str:
    return yaml.safe_load(lock.read_text())["stages"][stage]["outs"][0]["md5"]


def log_dataset(c: MlflowClient, run_id: str, table_path: Path, name: str, md5: str, remote: str,
                context: str = "training") -> None:
    """Record the curated table as an MLflow dataset whose source is its DVC remote object."""
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    source = f"{remote.rstrip('/')}/files/md5/{md5[:2]}/{md5[2:]}" if remote else str(table_path.resolve())
    with warnings.catch_warnings():
        # MLflow generates a local-file source class for both the "" and the "file" scheme, so every
        # local path "can be interpreted in multiple ways: LocalArtifactDatasetSource,
        # LocalArtifactDatasetSource". Both read the file alike: the warning says nothing.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple")
        ds = mlflow.data.from_pandas(pd.read_parquet(table_path), source=source, name=name, digest=md5[:16])
    c.log_inputs(run_id, [DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])])
