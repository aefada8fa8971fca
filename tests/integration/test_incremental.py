"""The invalidation table (docs/pipeline.md), row by row: which input retrains which model.

Real Prefect (ephemeral API), real MLflow (SQLite), real DVC (local remote), real torchrun,
a tiny random backbone. One project goes through the rows in order; after each change,
`metaloop run` must register a new version of exactly the models that row names, and say
for every other model that it skipped it and why.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from support import BIN, commit_all, flow_project, flow_run_logs, flow_runs_since, params_edit, prefect_client

pytestmark = pytest.mark.slow
META_TRAIN = ["hr_requests", "it_helpdesk", "education", "real_estate"]
PACKAGED = [*META_TRAIN, "fitness_gym", "hospitality", "veterinary_clinic"]
EXTRA = Path("data/raw/extra.csv")


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_api) -> Path:
    base = tmp_path_factory.mktemp("incremental")
    (base / "api").write_text(prefect_api)
    root = flow_project(base / "proj", env={**os.environ}, dvc_remote=base / "remote")
    _write_extra(root, [])
    params_edit(
        root,
        sources=[{"kind": "packaged", "per_label": 12, "domains": PACKAGED},
                 {"kind": "file", "path": str(EXTRA)}],
        domains={"meta_train": META_TRAIN, "meta_val": ["fitness_gym"], "target": ["hospitality", "veterinary_clinic"]},
        episodes={"ways": 3, "shots": 2, "queries": 2, "meta_train_episodes": 20, "meta_val_episodes": 2,
                  "eval_shots": [1], "eval_draws": 1},
        backbone={"name_or_path": "tiny", "pooling": "mean", "max_length": 32},
        meta={"algorithm": "protonet", "steps": 2, "checkpoint_every": 2, "val_every": 2, "val_episodes": 2,
              "nproc": 1, "meta_batch_size": 2},
        adapt={"epochs": 1},
        compress={"recipes": {}},
        registry={"recipe": "fp32"},
        # No challenger can gain 100 points: every retrained model after the first loses to its
        # champion, and the planner must count a losing challenger as up to date.
        promotion={"margin": 100.0},
    )
    commit_all(root)
    return root


def _write_extra(root: Path, rows: list[tuple[str, str, str]]) -> None:
    """The extra file source: one fixed row (a file source needs one), then `rows`."""
    with open(root / EXTRA, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "domain"])
        w.writerow(["a row in a domain that has no role", "anything", "no_role_desk"])
        w.writerows(rows)


def _label_of(domain: str) -> str:
    from metaloop.config import PackagedSource
    from metaloop.sources import read_source

    return next(r.label for r in read_source(PackagedSource(kind="packaged", domains=[domain]), 0))


def env_for(project: Path) -> dict:
    # PYTHONPATH: the project's own copy of the code is what runs (and what a code change edits).
    # a shared real Prefect server (tests/conftest.py): twelve runs, one API start
    return {**os.environ, "PREFECT_API_URL": (project.parent / "api").read_text(),
            "PREFECT_HOME": str(project.parent / "prefect-home"), "PYTHONPATH": str(project),
            "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}


def versions(project: Path) -> dict[str, int]:
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return {m.name.removeprefix("metaloop-"): len(c.search_model_versions(f"name = '{m.name}'"))
            for m in c.search_registered_models()}


def run(project: Path, *args: str) -> tuple[set[str], str]:
    """`metaloop run`; returns the models that got a new version, and the output (the CLI's
    table on stdout, then Prefect's log lines from stderr)."""
    before = versions(project)
    proc = subprocess.run([str(BIN / "metaloop"), "run", *args], cwd=project, env=env_for(project),
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    after = versions(project)
    return {m for m, n in after.items() if n > before.get(m, 0)}, proc.stdout + "\n" + proc.stderr


def client(project: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def version_tags(project: Path, model: str, version: str) -> dict[str, str]:
    return client(project).get_model_version(f"metaloop-{model}", version).tags


def champion(project: Path, model: str) -> str:
    return str(client(project).get_model_version_by_alias(f"metaloop-{model}", "champion").version)


def line(out: str, model: str) -> str:
    return next(ln for ln in out.splitlines() if ln.split()[:1] == [model])


def eval_hashes(project: Path) -> dict[str, str]:
    return json.loads((project / "data" / "episodes" / "manifest.json").read_text())["eval_hash_by_domain"]


def test_01_first_run_trains_everything(project):
    retrained, out = run(project)
    assert retrained == {"meta", "hospitality", "veterinary_clinic"}
    assert "new: no version registered" in line(out, "meta")


def test_02_nothing_changed_retrains_nothing(project):
    retrained, out = run(project)
    assert retrained == set() and "nothing changed" in out
    assert "skipped (unchanged since v1)" in line(out, "hospitality")


# flows/schedule.py's own `serve` (both deployments, as `metaloop serve` serves them), with the
# watcher's interval in seconds instead of params' minutes, and one flow run at a time: with
# runs due every 2 s, the runner then leaves the next ones scheduled instead of starting them
# into the deployment's concurrency limit (which would hold each back 30 s).
SERVE = """
import sys
from datetime import timedelta

import prefect

import flows.schedule as schedule

served = prefect.serve
prefect.serve = lambda *deployments, **kwargs: served(*deployments, limit=1, **kwargs)

configured = schedule.deployments


def fast(params_path):
    nightly, watch = configured(params_path)
    return [nightly, schedule.watch_sources.to_deployment(
        name=watch.name, interval=timedelta(seconds=float(sys.argv[1])), parameters=watch.parameters,
        tags=watch.tags, concurrency_limit=1, description=watch.description)]


schedule.deployments = fast
schedule.serve("params.yaml")
"""


def _wait(what: str, get, timeout: float, log: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = get()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"waited {timeout:.0f} s for {what}; served process log:\n" + log.read_text()[-4000:])


def test_03_a_changed_target_domain_retrains_alone_when_the_served_source_watcher_sees_it(project):
    """The watcher (`watch-sources`), really served: while the sources are unchanged its runs
    start nothing; once a file source changes, its next run starts the retrain flow, which
    retrains that domain alone."""
    hashes, before = eval_hashes(project), versions(project)
    api = (project.parent / "api").read_text()
    script, log = project.parent / "serve_fast.py", project.parent / "serve.log"
    script.write_text(SERVE)
    started = datetime.now(timezone.utc)
    with open(log, "w") as out:
        served = subprocess.Popen([sys.executable, str(script), "2"], cwd=project, stdout=out, stderr=subprocess.STDOUT,
                                  env={**env_for(project), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}, start_new_session=True)
    with prefect_client(api) as pc:
        try:
            def watched(since):
                return [r for r in flow_runs_since(pc, "metaloop-watch-sources", since) if r.state and r.state.is_final()]

            def retrains(since):
                """Retrain runs since then that left the Scheduled state (the served `nightly` cron's
                future runs are waiting there)."""
                return [r for r in flow_runs_since(pc, "metaloop-retrain", since) if r.state and not r.state.is_scheduled()]

            def logged(flow_run_id, *texts):
                """The run's log messages once each of `texts` is in one (the API gets logs in batches)."""
                return _wait(f"{texts} in the logs of flow run {flow_run_id}", lambda: (lambda logs: logs if all(
                    any(t in m for m in logs) for t in texts) else None)(flow_run_logs(pc, flow_run_id)), 30, log)

            def scheduled():
                from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

                return pc.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(
                    any_=["watch-sources"])), limit=1)

            # The server's scheduler creates the interval's runs. Prefect 3.8.8's fails on SQLAlchemy 2.1
            # ("Can't evaluate bulk DML statement" in the server's log): no schedule would ever fire.
            _wait("the Prefect server to schedule the watch deployment's runs", scheduled, 60, log)
            # unchanged sources: a completed watch run that started nothing
            [first, *_] = _wait("a completed watch run", lambda: watched(started), 180, log)
            assert first.state.is_completed(), first.state
            logged(first.id, "sources unchanged since the last curation")
            assert not retrains(started) and versions(project) == before
            changed = datetime.now(timezone.utc)
            _write_extra(project, [("could someone bring extra pillows to my room tonight",
                                    _label_of("hospitality"), "hospitality")])
            [retrain] = _wait("the retrain the watcher starts", lambda: [
                r for r in retrains(changed) if r.state.is_final()], 400, log)
            assert retrain.state.is_completed(), retrain.state
            # started by a watch run (as its subflow) that saw the change
            watcher = pc.read_flow_run(pc.read_task_run(retrain.parent_task_run_id).flow_run_id)
            assert watcher.flow_id == first.flow_id and watcher.id != first.id
            watcher = _wait("the watch run to end", lambda: (lambda r: r if r.state.is_final() else None)(
                pc.read_flow_run(watcher.id)), 60, log)
            assert watcher.state.is_completed(), watcher.state
            logged(watcher.id, "sources changed: starting the retrain flow")
            plan = logged(retrain.id, "hospitality: retrain (rows changed", "veterinary_clinic: skip (unchanged since v1)",
                          "meta: skip (unchanged since v1)")
        finally:
            os.killpg(served.pid, signal.SIGKILL)
            served.wait(timeout=30)
            for name in ("metaloop-watch-sources/watch-sources", "metaloop-retrain/nightly"):
                try:  # and with them their scheduled runs: nothing is left to fire on the shared server
                    pc.delete_deployment(pc.read_deployment_by_name(name).id)
                except Exception:
                    pass
    retrained = {m for m, n in versions(project).items() if n > before.get(m, 0)}
    assert retrained == {"hospitality"}
    assert not any("skip" in m for m in plan if m.startswith("hospitality:")), plan
    assert eval_hashes(project)["veterinary_clinic"] == hashes["veterinary_clinic"]
    # the retrained hospitality could not gain 100 points: a losing challenger
    assert version_tags(project, "hospitality", "2")["metaloop.decision"] == "keep"
    assert champion(project, "hospitality") == "1"


def test_04_a_new_target_domain_adapts_alone(project):
    hashes = eval_hashes(project)
    p = yaml.safe_load((project / "params.yaml").read_text())
    p["sources"][0]["domains"] = [*PACKAGED, "telecom_support"]
    params_edit(project, sources=p["sources"],
                domains={**p["domains"], "target": [*p["domains"]["target"], "telecom_support"]})
    retrained, out = run(project)
    # hospitality's v2 lost to v1 in the last run: still, nothing it is built from changed
    assert "skipped (unchanged since v2 (lost to the champion))" in line(out, "hospitality")
    assert retrained == {"telecom_support"}
    assert "new: no version registered" in line(out, "telecom_support")
    new = eval_hashes(project)
    assert {d: new[d] for d in hashes} == hashes  # no other domain's evaluation moved


def test_05_06_a_removed_domain_retrains_nothing_and_domain_params_retrain_the_other_domains(project):
    """Two rows in one run: the removed domain is neither retrained nor deleted, and the
    adapt params change retrains every remaining domain, but not the init."""
    p = yaml.safe_load((project / "params.yaml").read_text())
    params_edit(project, domains={**p["domains"], "target": ["hospitality", "telecom_support"]},
                adapt={"epochs": 2})
    retrained, out = run(project)
    assert retrained == {"hospitality", "telecom_support"}
    assert "removed from domains.target" in line(out, "veterinary_clinic")
    assert versions(project)["veterinary_clinic"] == 1  # its models stay in the registry
    assert "params changed" in line(out, "hospitality") and "skipped" in line(out, "meta")


def test_07_evaluation_draws_retrain_the_domains_not_the_init(project):
    """New evaluation episodes: each champion is re-scored on them before the comparison. One
    champion's registered model is gone (its artifacts deleted): a warning, then the comparison
    is refused, not the run."""
    p = yaml.safe_load((project / "params.yaml").read_text())
    params_edit(project, episodes={**p["episodes"], "eval_draws": 2})
    c = client(project)
    lost = c.get_model_version("metaloop-telecom_support", champion(project, "telecom_support"))
    assert str(lost.version) == "1"
    shutil.rmtree(Path(c.get_run(lost.run_id).info.artifact_uri.removeprefix("file://")) / "model")
    retrained, out = run(project)
    assert retrained == {"hospitality", "telecom_support"}
    assert "evaluation episodes changed" in line(out, "telecom_support")
    new = eval_hashes(project)
    assert "metaloop-telecom_support: could not re-score champion v1 on the current episodes" in out, out[-4000:]
    assert f"metaloop.scores.{new['telecom_support'][:16]}" not in version_tags(project, "telecom_support", "1")
    reasons = json.loads(version_tags(project, "telecom_support", "3")["metaloop.reasons"])
    assert any(r.startswith("evaluated on a different set") for r in reasons), reasons
    # hospitality's champion was re-scored on the new episodes, and compared on them
    assert f"metaloop.scores.{new['hospitality'][:16]}" in version_tags(project, "hospitality", "1")
    assert "metaloop-hospitality: could not re-score" not in out
    assert not any("different set" in r for r in json.loads(version_tags(project, "hospitality", "4")["metaloop.reasons"]))


def test_08_meta_params_retrain_the_init_and_every_domain(project):
    p = yaml.safe_load((project / "params.yaml").read_text())
    params_edit(project, meta={**p["meta"], "outer_lr": 1e-4})
    retrained, out = run(project)
    assert retrained == {"meta", "hospitality", "telecom_support"}
    assert "params changed" in line(out, "meta") and "new init" in line(out, "hospitality")


def test_09_changed_meta_train_rows_retrain_the_init_and_every_domain(project):
    rows = list(csv.reader(open(project / EXTRA)))[2:]
    _write_extra(project, [*map(tuple, rows), ("my laptop will not connect to the office vpn at all",
                                               _label_of("it_helpdesk"), "it_helpdesk")])
    retrained, out = run(project)
    assert retrained == {"meta", "hospitality", "telecom_support"}
    assert "rows changed" in line(out, "meta")


def test_10_a_code_change_retrains_everything(project):
    assert (project / "metaloop" / "evaluate.py").is_file()  # an existing module (metaloop/adapt is a package)
    with open(project / "metaloop" / "evaluate.py", "a") as f:
        f.write("\n# a code change\n")
    retrained, out = run(project)
    assert retrained == {"meta", "hospitality", "telecom_support"}
    assert "code changed" in line(out, "meta")


def test_11_domain_flag_retrains_that_domain_only(project):
    retrained, out = run(project, "--domain", "telecom_support")
    assert retrained == {"telecom_support"}
    assert "not selected (--domain)" in line(out, "hospitality")


def test_12_force_retrains_everything(project):
    # Nothing changed since the last runs (the init's newest version is its up-to-date one), yet
    # --force retrains: the new init version carries the same fingerprint as the one before.
    meta_before = versions(project)["meta"]
    retrained, out = run(project, "--force")
    assert retrained == {"meta", "hospitality", "telecom_support"}
    assert "--force" in line(out, "meta")
    assert (version_tags(project, "meta", str(meta_before + 1))["metaloop.fingerprint"]
            == version_tags(project, "meta", str(meta_before))["metaloop.fingerprint"])
    again, out = run(project)  # and what --force registered is what the next run compares with
    assert again == set(), out[-2000:]
    # ...even though every one of them lost to its champion: "nothing changed", before Prefect starts
    assert "nothing changed" in out and "(lost to the champion)" in line(out, "meta")
