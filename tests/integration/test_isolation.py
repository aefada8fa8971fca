"""One domain's failure never sinks the others, at any stage (issue 28).

Real Prefect, MLflow (SQLite), DVC and torchrun with a tiny backbone. The first run injects
a real failure (tasks/stages.py: METALOOP_INJECT_FAULT) at a different stage in each of seven
target domains, and in the report; an eighth domain is healthy. Every failure must be
recorded for its own domain, naming the stage; the healthy domain registered and promoted;
nothing half-registered. The next runs, without faults, heal what was left: a pending
promotion is decided, abandoned versions are marked so, and a kill between a version's
creation and its tags leaves nothing that claims an evaluation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from support import BIN, commit_all, flow_project, params_edit

pytestmark = pytest.mark.slow
HEALTHY = "hospitality"
FAULTS = {"veterinary_clinic": "data", "telecom_support": "adaptation", "ecommerce_returns": "evaluation",
          "insurance_claims": "compression", "healthcare_appointments": "registration",
          "real_estate": "version-created", "utility_billing": "promotion"}
STAGE_SHOWN = {**FAULTS, "real_estate": "registration"}  # the version-created point is inside registration


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_api) -> Path:
    base = tmp_path_factory.mktemp("isolation")
    (base / "api").write_text(prefect_api)  # a shared real Prefect server (tests/conftest.py)
    root = flow_project(base / "proj", env={**os.environ})
    targets = [HEALTHY, *FAULTS]
    params_edit(
        root,
        sources=[{"kind": "packaged", "per_label": 10, "domains": ["hr_requests", "it_helpdesk", "education", *targets]}],
        domains={"meta_train": ["hr_requests", "it_helpdesk"], "meta_val": ["education"], "target": targets},
        episodes={"ways": 3, "shots": 2, "queries": 2, "meta_train_episodes": 10, "meta_val_episodes": 2,
                  "eval_shots": [1], "eval_draws": 1},
        backbone={"name_or_path": "tiny", "pooling": "mean", "max_length": 32},
        meta={"algorithm": "protonet", "steps": 2, "checkpoint_every": 2, "val_every": 2, "val_episodes": 2,
              "nproc": 1},
        adapt={"epochs": 1}, compress={"recipes": {"int8": ["int8"]}}, registry={"recipe": "int8"},
        promotion={"alpha": None},
    )
    commit_all(root)
    return root


def run(project: Path, *args: str, faults: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": (project.parent / "api").read_text(),
           "PREFECT_HOME": str(project.parent / "prefect-home"), "PYTHONPATH": str(project),
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "OMP_NUM_THREADS": "1",
           "METALOOP_INJECT_FAULT": faults}
    # Its own session, output to files: a killed run leaves Prefect's ephemeral server behind,
    # holding pipes open; the whole group is ended once the run itself has exited.
    log = project.parent / "run.log"
    with open(log, "w") as out, open(project.parent / "run.err", "w") as err:
        proc = subprocess.Popen([str(BIN / "metaloop"), "run", *args], cwd=project, env=env, stdout=out, stderr=err,
                                text=True, start_new_session=True)
        try:
            code = proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(proc.args, code, log.read_text(), (project.parent / "run.err").read_text())


def client(project: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def versions(c, domain: str) -> dict[str, dict]:
    """version -> its tags, plus `_aliases` (the registered model's aliases pointing at it)."""
    found = c.search_model_versions(f"name = 'metaloop-{domain}'")
    aliases = c.get_registered_model(f"metaloop-{domain}").aliases if found else {}
    return {str(v.version): {**v.tags, "_aliases": sorted(a for a, n in aliases.items() if str(n) == str(v.version))}
            for v in found}


def test_a_failure_at_any_stage_stays_with_its_domain(project):
    faults = ",".join(f"{d}:{s}" for d, s in FAULTS.items()) + ",*:report"
    proc = run(project, faults=faults)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    for domain, stage in STAGE_SHOWN.items():
        line = next(ln for ln in proc.stdout.splitlines() if ln.split()[:1] == [domain])
        assert f"failed: {stage}: InjectedFault" in line, line
    assert "failed: report" in proc.stdout or "report: InjectedFault" in out
    c = client(project)
    # the healthy domain went all the way
    assert versions(c, HEALTHY)["1"]["_aliases"] == ["champion"]
    # failures before the version existed registered nothing
    for domain in ("veterinary_clinic", "telecom_support", "ecommerce_returns", "insurance_claims",
                   "healthcare_appointments"):
        assert versions(c, domain) == {}, domain
    # a failure right after the version was created: no alias, nothing that claims an evaluation
    half = versions(c, "real_estate")["1"]
    assert half["_aliases"] == [] and half["metaloop.state"].startswith("abandoned")
    assert not {"metaloop.metrics", "metaloop.correct", "metaloop.fingerprint"} & half.keys()
    # a failed promotion: registered as challenger, never decided, no champion
    pending = versions(c, "utility_billing")["1"]
    assert pending["_aliases"] == ["challenger"] and "metaloop.decision" not in pending
    # MLflow shows failed runs as FAILED, never RUNNING
    exp = c.get_experiment_by_name("metaloop").experiment_id
    runs = {r.data.tags.get("metaloop.domain"): r for r in c.search_runs([exp]) if r.data.tags.get("metaloop.domain")}
    for domain in FAULTS:  # a failed promotion still built and registered its model: that run finished
        want = "FINISHED" if FAULTS[domain] == "promotion" else "FAILED"
        assert runs[domain].info.status == want, (domain, runs[domain].info.status)
    assert runs[HEALTHY].info.status == "FINISHED"
    # the report failed, so the flow closed the parent run itself: FAILED; meta-training succeeded
    by_name = {r.info.run_name: r for r in c.search_runs([exp]) if not r.data.tags.get("metaloop.domain")}
    [parent] = [r for n, r in by_name.items() if n.startswith("retrain ")]
    assert parent.info.status == "FAILED"
    assert by_name["meta-train"].info.status == by_name["curate"].info.status == "FINISHED"
    assert all(r.info.status != "RUNNING" for r in c.search_runs([exp]))


def test_the_next_run_heals_what_was_left(project):
    proc = run(project)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    c = client(project)
    assert "promotion retried" in next(ln for ln in proc.stdout.splitlines() if ln.startswith("utility_billing"))
    assert versions(c, "utility_billing")["1"]["_aliases"] == ["champion"]  # decided, not retrained
    assert versions(c, "real_estate")["2"]["_aliases"] == ["champion"]
    assert versions(c, HEALTHY).keys() == {"1"}  # untouched
    for domain in ("veterinary_clinic", "telecom_support", "ecommerce_returns", "insurance_claims",
                   "healthcare_appointments"):
        assert versions(c, domain)["1"]["_aliases"] == ["champion"], domain


def test_a_kill_between_creation_and_tags_leaves_nothing_that_claims_an_evaluation(project):
    proc = run(project, "--domain", HEALTHY, faults=f"{HEALTHY}:version-created:kill")
    assert proc.returncode == -9, (proc.stdout + proc.stderr)[-3000:]
    c = client(project)
    killed = versions(c, HEALTHY)["2"]
    assert killed["metaloop.state"] == "registering" and killed["_aliases"] == []
    assert not {"metaloop.metrics", "metaloop.correct", "metaloop.fingerprint"} & killed.keys()
    assert versions(c, HEALTHY)["1"]["_aliases"] == ["champion"]
    # nothing stale for the planner: the killed version has no alias, so v1 still serves
    again = run(project)
    assert again.returncode == 0 and "nothing changed" in again.stdout, again.stdout[-2000:]
    # the next registration marks it abandoned
    proc = run(project, "--domain", HEALTHY)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert versions(c, HEALTHY)["2"]["metaloop.state"].startswith("abandoned")
    assert json.loads(versions(c, HEALTHY)["3"]["metaloop.metrics"])


def test_a_failed_rank_ends_the_meta_and_parent_runs_failed(project):
    """A rank that cannot load the backbone ends meta-training (its MetaloopError, no retry):
    the meta-train and parent MLflow runs end FAILED, not RUNNING."""
    c = client(project)
    exp = c.get_experiment_by_name("metaloop").experiment_id
    seen = {r.info.run_id for r in c.search_runs([exp])}
    config = project / "tiny" / "config.json"
    good = config.read_text()
    config.write_text("{ this is not json")
    try:
        proc = run(project, "--force")
    finally:
        config.write_text(good)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]  # an input error: one message, status 2
    assert "meta-training rank" in out and "cannot load an encoder" in out, out[-4000:]
    new = {r.info.run_name.split(" ")[0]: r for r in c.search_runs([exp]) if r.info.run_id not in seen}
    assert set(new) == {"retrain", "curate", "meta-train"}, set(new)  # the domains never started
    assert new["meta-train"].info.status == "FAILED" and new["retrain"].info.status == "FAILED"
    assert new["curate"].info.status == "FINISHED"
