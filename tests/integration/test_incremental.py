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
import subprocess
from pathlib import Path

import pytest
import yaml

from support import BIN, commit_all, flow_project, params_edit

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
    """`metaloop run`; returns the models that got a new version, and the output."""
    before = versions(project)
    proc = subprocess.run([str(BIN / "metaloop"), "run", *args], cwd=project, env=env_for(project),
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    after = versions(project)
    return {m for m, n in after.items() if n > before.get(m, 0)}, proc.stdout


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


def test_03_a_changed_target_domain_retrains_alone(project):
    hashes = eval_hashes(project)
    _write_extra(project, [("could someone bring extra pillows to my room tonight", _label_of("hospitality"),
                            "hospitality")])
    retrained, out = run(project)
    assert retrained == {"hospitality"}
    assert "rows changed" in line(out, "hospitality")
    assert "skipped (unchanged since v1)" in line(out, "veterinary_clinic") and "skipped" in line(out, "meta")
    assert eval_hashes(project)["veterinary_clinic"] == hashes["veterinary_clinic"]


def test_04_a_new_target_domain_adapts_alone(project):
    hashes = eval_hashes(project)
    p = yaml.safe_load((project / "params.yaml").read_text())
    p["sources"][0]["domains"] = [*PACKAGED, "telecom_support"]
    params_edit(project, sources=p["sources"],
                domains={**p["domains"], "target": [*p["domains"]["target"], "telecom_support"]})
    retrained, out = run(project)
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
    p = yaml.safe_load((project / "params.yaml").read_text())
    params_edit(project, episodes={**p["episodes"], "eval_draws": 2})
    retrained, out = run(project)
    assert retrained == {"hospitality", "telecom_support"}
    assert "evaluation episodes changed" in line(out, "telecom_support")


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
    with open(project / "metaloop" / "adapt.py", "a") as f:
        f.write("\n# a code change\n")
    retrained, out = run(project)
    assert retrained == {"meta", "hospitality", "telecom_support"}
    assert "code changed" in line(out, "meta")


def test_11_domain_flag_retrains_that_domain_only(project):
    retrained, out = run(project, "--domain", "telecom_support")
    assert retrained == {"telecom_support"}
    assert "not selected (--domain)" in line(out, "hospitality")


def test_12_force_retrains_everything(project):
    retrained, out = run(project, "--force")
    assert retrained == {"meta", "hospitality", "telecom_support"}
    again, out = run(project)  # and what --force registered is what the next run compares with
    assert again == set(), out[-2000:]
