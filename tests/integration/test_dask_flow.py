"""The retrain flow fanned out on a real Dask LocalCluster (prefect-dask): 2 worker processes,
2 target domains, real Prefect (ephemeral API), MLflow (SQLite), DVC and torchrun, a tiny
random backbone. Each domain's MLflow run records the process that built it."""

from __future__ import annotations

import os
import subprocess

import pytest

from support import BIN, commit_all, flow_project, params_edit

pytestmark = pytest.mark.slow
TARGETS = ["hospitality", "veterinary_clinic"]


def test_domains_run_on_dask_worker_processes_with_their_share_of_the_cores(tmp_path, prefect_api):
    root = flow_project(tmp_path / "proj", env={**os.environ})
    params_edit(
        root,
        sources=[{"kind": "packaged", "per_label": 12, "domains": ["hr_requests", "it_helpdesk", "education", *TARGETS]}],
        domains={"meta_train": ["hr_requests", "it_helpdesk"], "meta_val": ["education"], "target": TARGETS},
        episodes={"ways": 3, "shots": 2, "queries": 2, "meta_train_episodes": 10, "meta_val_episodes": 2,
                  "eval_shots": [1], "eval_draws": 1},
        backbone={"name_or_path": "tiny", "pooling": "mean", "max_length": 32},
        meta={"algorithm": "protonet", "steps": 2, "checkpoint_every": 2, "val_every": 2, "val_episodes": 2, "nproc": 1},
        adapt={"epochs": 1}, compress={"recipes": {}}, registry={"recipe": "fp32"},
        flow={"task_runner": "dask", "max_workers": 2, "threads_per_worker": 1},
    )
    commit_all(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "MLFLOW_TRACKING_URI": uri,
           "PYTHONPATH": str(root)}
    proc = subprocess.Popen([str(BIN / "metaloop"), "run"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-5000:]

    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for d in TARGETS:
        assert str(c.get_model_version_by_alias(f"metaloop-{d}", "champion").version) == "1"
    runs = c.search_runs([c.get_experiment_by_name("metaloop").experiment_id], "tags.`metaloop.domain` != ''")
    assert sorted(r.data.tags["metaloop.domain"] for r in runs) == TARGETS
    workers = {r.data.tags["metaloop.worker"] for r in runs}
    # Not the flow's own process (the CLI's, where the threads runner would have run them).
    assert all(int(w.split(":")[1]) != proc.pid for w in workers), workers
    assert {r.data.tags["metaloop.torch_threads"] for r in runs} == {"1"}  # threads_per_worker, not all cores
