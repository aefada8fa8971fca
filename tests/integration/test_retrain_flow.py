"""The retrain flow end to end: real Prefect (ephemeral API), real MLflow (SQLite), real DVC
(local remote), real torchrun (2 processes), a tiny random backbone, a slice of the corpus.

One project folder goes through the scenarios in order: first run trains and promotes;
the second skips; a run with changed data (and one broken domain) follows the policy and
fails naming that domain while the others are registered; a killed rank is retried and
meta-training resumes; the served deployment carries the configured cron.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from support import BIN, ROOT, commit_all, flow_project, flow_runs_since, params_edit, prefect_client

pytestmark = pytest.mark.slow
TARGET = "hospitality"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("flow")
    root = flow_project(base / "proj", env={**os.environ}, dvc_remote=base / "remote")
    params_edit(
        root,
        sources=[{"kind": "packaged", "per_label": 16, "domains": [
            "hr_requests", "it_helpdesk", "education", "real_estate", "fitness_gym", TARGET, "veterinary_clinic"]}],
        domains={"meta_train": ["hr_requests", "it_helpdesk", "education", "real_estate"],
                 "meta_val": ["fitness_gym"], "target": [TARGET]},
        episodes={"ways": 3, "shots": 2, "queries": 2, "meta_train_episodes": 40, "meta_val_episodes": 4,
                  "eval_shots": [1, 2], "eval_draws": 2},
        backbone={"name_or_path": "tiny", "pooling": "mean", "max_length": 32},
        meta={"algorithm": "protonet", "steps": 4, "checkpoint_every": 2, "val_every": 2, "val_episodes": 2,
              "nproc": 2, "meta_batch_size": 2},
        adapt={"epochs": 1},
        compress={"recipes": {"int8": ["int8"]}},
    )
    commit_all(root)
    return root


def env_for(project: Path) -> dict:
    return {**os.environ, "PREFECT_HOME": str(project.parent / "prefect-home"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}


def metaloop_run(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "metaloop"), "run", *args], cwd=project, env=env_for(project),
                          capture_output=True, text=True, timeout=600)


def client(project: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def alias(c, name: str, which: str) -> str | None:
    try:
        return str(c.get_model_version_by_alias(name, which).version)
    except Exception:
        return None


def test_1_first_run_trains_registers_and_promotes(project):
    proc = metaloop_run(project)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "retrain: trained" in proc.stdout and "mlflow ui" in proc.stdout
    c = client(project)
    assert alias(c, f"metaloop-{TARGET}", "champion") == "1"
    assert alias(c, "metaloop-meta", "champion") == "1"
    tags = c.get_model_version(f"metaloop-{TARGET}", "1").tags
    for key in ("data_hash", "git_commit", "params_hash", "code_version", "eval_hash", "recipe", "parent_run_id",
                "metrics", "decision", "reasons", "correct"):
        assert tags.get(f"metaloop.{key}"), key
    from metaloop.promotion import read_outcomes  # the record the significance test compares

    right = read_outcomes(tags["metaloop.correct"])
    assert 100.0 * sum(right) / len(right) == pytest.approx(json.loads(tags["metaloop.metrics"])["accuracy"], abs=1e-3)
    manifest = json.loads((project / "data" / "episodes" / "manifest.json").read_text())
    assert tags["metaloop.eval_hash"] == manifest["eval_hash_by_domain"][TARGET]
    # The registered model is the one registry.recipe names, and what its version claims is what
    # the domain's run measured for that recipe (docs/pipeline.md, MLflow layout).
    from metaloop.config import load_params

    recipe = load_params(project / "params.yaml").registry.recipe
    assert recipe == "int8" and tags["metaloop.recipe"] == recipe
    version = c.get_model_version(f"metaloop-{TARGET}", "1")
    assert version.source == f"runs:/{version.run_id}/model"
    run = c.get_run(version.run_id)
    assert run.info.run_name == f"domain {TARGET}" and run.data.tags["metaloop.recipe"] == recipe
    logged = run.data.metrics
    for key in ("accuracy_before", "n_train", "epochs_run", "fp32.accuracy", "fp32.size_mb", "fp32.p50_ms_batch1",
                f"{recipe}.accuracy", f"{recipe}.size_mb", f"{recipe}.p50_ms_batch1", f"{recipe}.agreement_train",
                "accuracy", "size_mb", "p50_ms_batch1"):
        assert key in logged, (key, sorted(logged))
    claimed = json.loads(tags["metaloop.metrics"])
    assert logged["accuracy"] == logged[f"{recipe}.accuracy"]
    assert claimed["accuracy"] == pytest.approx(logged[f"{recipe}.accuracy"], abs=1e-3)
    assert claimed["size_mb"] == pytest.approx(logged[f"{recipe}.size_mb"], abs=1e-3)
    assert claimed["accuracy_adapted"] == pytest.approx(logged["fp32.accuracy"], abs=1e-3)
    assert claimed["accuracy_before"] == pytest.approx(logged["accuracy_before"], abs=1e-3)
    assert logged[f"{recipe}.size_mb"] < logged["fp32.size_mb"]  # the compressed model, not the fp32 one
    # one evaluation artifact per recipe, holding the per-query record the version carries
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id, "eval")}
    assert artifacts == {"eval/fp32.json", f"eval/{recipe}.json"}, artifacts
    scratch = project.parent / "downloads"
    evaluation = json.loads(Path(c.download_artifacts(run.info.run_id, f"eval/{recipe}.json", str(scratch))).read_text())
    assert evaluation["recipe"] == recipe and evaluation["correct"] == tags["metaloop.correct"]
    assert evaluation["eval_hash"] == tags["metaloop.eval_hash"] and evaluation["n_test"] == len(right)
    # ...and the registered pyfunc carries exactly the folder that recipe wrote
    from tasks.registry import download_classifier

    served = download_classifier(c, f"metaloop-{TARGET}", "1", scratch / "registered")
    built = project / "artifacts" / "adapted" / TARGET / recipe
    files = lambda d: {f.relative_to(d).as_posix(): f.read_bytes() for f in d.rglob("*") if f.is_file()}  # noqa: E731
    assert files(served) == files(built)
    parent = c.get_run(tags["metaloop.parent_run_id"])
    assert parent.data.params["episodes.shots"] == "2"  # the whole params.yaml, flattened
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.info.run_name for r in children} >= {"curate", "meta-train", f"domain {TARGET}"}
    meta_run = next(r for r in children if r.info.run_name == "meta-train")
    assert any(k.startswith("system/") for k in meta_run.data.metrics)  # system metrics on
    assert c.get_metric_history(meta_run.info.run_id, "train_loss")  # curves with steps


def test_2_second_run_skips(project):
    proc = metaloop_run(project)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "nothing changed" in proc.stdout
    # ...and still shows what serves: the champions table.
    assert any(ln.split()[:2] == [TARGET, "1"] for ln in proc.stdout.splitlines()), proc.stdout[-2000:]
    assert alias(client(project), f"metaloop-{TARGET}", "champion") == "1"
    # The flow decides the same way on its own (a scheduled run has no CLI pre-check).
    flow = subprocess.run([sys.executable, "-m", "flows.retrain"], cwd=project, env=env_for(project),
                          capture_output=True, text=True, timeout=300)
    assert flow.returncode == 0, flow.stdout[-3000:] + flow.stderr[-3000:]
    assert "'status': 'nothing changed'" in flow.stdout, flow.stdout[-2000:]
    assert len(client(project).search_model_versions(f"name = 'metaloop-{TARGET}'")) == 1


def test_3_changed_data_follows_policy_and_one_broken_domain_does_not_sink_the_others(project):
    rows = ["text,label,domain,split"]
    for label in ("alpha", "beta"):
        rows += [f"{label} request number {i} for the broken desk,{label},broken_desk,{'test' if i > 2 else 'train'}"
                 for i in range(5)]
    (project / "data" / "raw" / "broken.csv").write_text("\n".join(rows) + "\n")
    p = yaml.safe_load((project / "params.yaml").read_text())
    params_edit(project,
                sources=p["sources"] + [{"kind": "file", "path": "data/raw/broken.csv"}],
                domains={**p["domains"], "target": [TARGET, "veterinary_clinic", "broken_desk"]},
                adapt={"epochs": 1, "shots": 4},  # broken_desk has only 3 train rows a label
                episodes={**p["episodes"], "eval_draws": 3})  # new evaluation episodes for every domain
    proc = metaloop_run(project)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "broken_desk" in proc.stdout and "failed" in proc.stdout
    healthy_failed = [ln for ln in proc.stdout.splitlines() if ln.startswith((TARGET, "veterinary")) and "failed:" in ln]
    assert not healthy_failed, proc.stdout[-3000:]
    c = client(project)
    assert alias(c, "metaloop-veterinary_clinic", "champion") == "1"  # the healthy new domain is promoted
    v2 = c.get_model_version(f"metaloop-{TARGET}", "2")
    decision = v2.tags["metaloop.decision"]
    # The champion was scored on other episodes: the flow re-scored it on the new ones, so the
    # decision compares like with like (no "different set" refusal).
    new_hash = v2.tags["metaloop.eval_hash"]
    v1 = c.get_model_version(f"metaloop-{TARGET}", "1")
    assert v1.tags["metaloop.eval_hash"] != new_hash
    rescored = json.loads(v1.tags[f"metaloop.scores.{new_hash[:16]}"])
    assert rescored["eval_hash"] == new_hash and rescored["correct"]
    # accuracy only: promotion never compares a champion's latency, so it is not re-timed
    assert "accuracy" in rescored["metrics"] and "p50_ms_batch1" not in rescored["metrics"]
    assert "different set" not in v2.tags["metaloop.reasons"], v2.tags["metaloop.reasons"]
    # The decision is the one the policy (params.yaml's promotion: margin 0.5 points, sign test at
    # alpha 0.05, nothing guarded, no budgets) gives for the two recorded scores, worked out here.
    from metaloop.config import load_params
    from metaloop.promotion import read_outcomes

    policy = load_params(project / "params.yaml").promotion
    assert (policy.metric, policy.margin, policy.alpha, policy.guarded, policy.max_size_mb, policy.max_p50_ms) == \
        ("accuracy", 0.5, 0.05, {}, None, None)
    gain = json.loads(v2.tags["metaloop.metrics"])["accuracy"] - rescored["metrics"]["accuracy"]
    mine, theirs = read_outcomes(v2.tags["metaloop.correct"]), read_outcomes(rescored["correct"])
    assert len(mine) == len(theirs)
    wins = sum(a and not b for a, b in zip(mine, theirs))
    losses = sum(b and not a for a, b in zip(mine, theirs))
    n = wins + losses
    p_value = sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n if n else 1.0
    beats, significant = gain > 1e-9 and gain >= 0.5 - 1e-9, p_value <= 0.05
    reasons = json.loads(v2.tags["metaloop.reasons"])
    assert decision == ("promote" if beats and significant else "keep"), (gain, wins, losses, reasons)
    assert v2.tags["metaloop.decided_against"] == "1"
    assert any("below the margin" in r for r in reasons) == (not beats), (gain, reasons)
    assert any(f"{wins} queries newly right, {losses} newly wrong" in r for r in reasons) == (not significant), \
        (wins, losses, reasons)
    if beats and significant:
        assert reasons == ["passes every check against champion v1"]
    else:
        assert len(reasons) == (not beats) + (not significant), reasons
    assert alias(c, f"metaloop-{TARGET}", "champion") == ("2" if decision == "promote" else "1")
    assert v2.tags["metaloop.data_hash"] != c.get_model_version(f"metaloop-{TARGET}", "1").tags["metaloop.data_hash"]
    assert not c.search_registered_models("name = 'metaloop-broken_desk'")
    # MLflow: the broken domain's run and the parent end FAILED (the report ran: it closes the
    # parent), the healthy domains' runs FINISHED; nothing is left RUNNING.
    parent = c.get_run(v2.tags["metaloop.parent_run_id"])
    assert parent.info.status == "FAILED"
    children = {r.info.run_name: r for r in c.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    broken = children["domain broken_desk"]
    assert broken.info.status == "FAILED" and broken.data.tags["metaloop.failed_stage"] == "adaptation"
    assert "failed: adaptation:" in next(ln for ln in proc.stdout.splitlines() if ln.startswith("broken_desk"))
    assert children[f"domain {TARGET}"].info.status == children["domain veterinary_clinic"].info.status == "FINISHED"
    assert all(r.info.status != "RUNNING" for r in children.values())


def test_4_killed_rank_is_retried_and_resumes(project, prefect_api):
    """On the shared Prefect server (tests/conftest.py), whose API then tells how often the
    meta-train task ran: the retry is read from Prefect's task-run states, not from log words."""
    from datetime import datetime, timezone

    p = yaml.safe_load((project / "params.yaml").read_text())
    params_edit(project,
                sources=p["sources"][:1], domains={**p["domains"], "target": [TARGET]},
                meta={**p["meta"], "steps": 150, "checkpoint_every": 10, "val_every": 150, "max_restarts": 0})
    started = datetime.now(timezone.utc)
    proc = subprocess.Popen([str(BIN / "metaloop"), "run", "--force"], cwd=project,
                            env={**env_for(project), "PREFECT_API_URL": prefect_api},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latest = project / "artifacts" / "meta" / "checkpoints" / "latest.json"
    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and proc.poll() is None:
        if latest.is_file() and json.loads(latest.read_text())["step"] >= 10:
            for q in psutil.process_iter(["cmdline", "cwd"]):
                cmd = " ".join(q.info["cmdline"] or [])
                if "metaloop.train" in cmd and "torch.distributed.run" not in cmd and q.info["cwd"] == str(project):
                    q.kill()
                    killed = q.pid
                    break
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=600)
    assert killed, "no rank was found to kill\n" + out[-3000:]
    assert proc.returncode == 0, out[-4000:]
    with prefect_client(prefect_api) as api:
        [flow_run] = flow_runs_since(api, "metaloop-retrain", started)
        assert flow_run.state.is_completed(), flow_run.state
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        task_runs = api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        [meta] = [t for t in task_runs if t.name.startswith("meta-train")]
        states = [st.name for st in api.read_task_run_states(meta.id)]
    # two attempts: the killed one, then one retry, which completed
    assert meta.run_count == 2 and meta.state.is_completed(), (meta.run_count, states)
    assert states.count("Running") == 1 and states.count("Retrying") == 1 and states[-1] == "Completed", states
    assert "AwaitingRetry" in states, states
    summary = json.loads((project / "artifacts" / "meta" / "summary.json").read_text())
    assert summary["resumed_from"] and summary["resumed_from"] >= 10 and summary["step"] == 150


def test_5_served_deployments_carry_the_cron(project):
    sys.path.insert(0, str(project))
    from flows.schedule import deployments

    params = yaml.safe_load((project / "params.yaml").read_text())
    nightly, watch = deployments(str(project / "params.yaml"))
    assert nightly.schedules[0].schedule.cron == params.get("flow", {}).get("cron", "0 2 * * *")
    assert watch.schedules[0].schedule.interval.total_seconds() == 15 * 60
    assert nightly.concurrency_limit == 1 and watch.concurrency_limit == 1  # one run at a time
    shipped = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    shipped_cron = {d["name"]: d["schedules"][0].get("cron") for d in shipped["deployments"]}
    assert all(d["concurrency_limit"] == 1 for d in shipped["deployments"])
    from metaloop.config import load_params

    assert shipped_cron["nightly"] == load_params(ROOT / "params.yaml").flow.cron
