"""Two runs at once in one project (issue 23): the second exits at once, naming the first,
and writes nothing. Two real `metaloop run` processes, real Prefect, MLflow, DVC, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from support import BIN, commit_all, flow_project, params_edit

pytestmark = pytest.mark.slow


def test_a_second_run_exits_at_once_naming_the_first_and_writes_nothing(tmp_path, prefect_api):
    root = flow_project(tmp_path / "proj", env={**os.environ})
    params_edit(
        root,
        sources=[{"kind": "packaged", "per_label": 10, "domains": ["hr_requests", "it_helpdesk", "education",
                                                                  "hospitality"]}],
        domains={"meta_train": ["hr_requests", "it_helpdesk"], "meta_val": ["education"], "target": ["hospitality"]},
        episodes={"ways": 3, "shots": 2, "queries": 2, "meta_train_episodes": 10, "meta_val_episodes": 2,
                  "eval_shots": [1], "eval_draws": 1},
        backbone={"name_or_path": "tiny", "pooling": "mean", "max_length": 32},
        meta={"algorithm": "protonet", "steps": 100000, "checkpoint_every": 5, "val_every": 100000, "val_episodes": 2,
              "nproc": 1},
        adapt={"epochs": 1}, compress={"recipes": {}}, registry={"recipe": "fp32"},
    )
    commit_all(root)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PYTHONPATH": str(root),
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "first.log", "w")
    # meta-training long enough to be running throughout; ended by the test, with its whole group
    first = subprocess.Popen([str(BIN / "metaloop"), "run"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        latest = root / "artifacts" / "meta" / "checkpoints" / "latest.json"
        deadline = time.time() + 300
        while not latest.is_file() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert latest.is_file(), "the first run never reached meta-training"
        watched = [p for d in ("data/curated", "data/episodes") for p in (root / d).iterdir()]
        before = {p: p.stat().st_mtime_ns for p in watched}
        second = subprocess.run([str(BIN / "metaloop"), "run", "--force"], cwd=root, env=env, capture_output=True,
                                text=True, timeout=300)
        assert first.poll() is None, "the first run ended before the second started: nothing was tested"
        holder = json.loads((root / ".metaloop-run.lock").read_text())
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert "another metaloop run holds" in second.stderr and f"pid {holder['pid']}" in second.stderr
        assert "Running stage" not in second.stdout + second.stderr  # it reached no DVC stage
        assert {p: p.stat().st_mtime_ns for p in watched} == before
        assert first.poll() is None  # and the first run goes on, untouched
    finally:
        _end_everything_started_in(root, first)
        log.close()
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("metaloop").experiment_id
    parents = [r for r in c.search_runs([exp]) if r.info.run_name.startswith("retrain")]
    assert len(parents) == 1  # the second run opened no MLflow run
    assert "another metaloop run" not in (tmp_path / "first.log").read_text()


def _end_everything_started_in(root: Path, first: subprocess.Popen) -> None:
    """The first run's whole tree: its session, and torchrun's workers, which run in sessions
    of their own (found by their working folder)."""
    import signal

    import psutil

    try:
        os.killpg(first.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for q in psutil.process_iter(["cwd"]):
        if q.info["cwd"] == str(root) and q.pid != os.getpid():
            q.kill()
    first.wait(timeout=60)
