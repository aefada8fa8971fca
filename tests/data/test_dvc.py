"""Real DVC in a throwaway git repo: no-op re-runs, partial re-runs, local and S3 remotes."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from support import copy_project, run_cli


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(folder).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def set_param(repo: Path, section: str, key: str, value) -> None:
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def ran(stdout: str) -> set[str]:
    return {s for s in ("curate", "episodes") if f"Running stage '{s}'" in stdout}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = copy_project(tmp_path_factory.mktemp("dvcrepo"))
    set_param(repo, "episodes", "meta_train_episodes", 100)
    run_cli("dvc", "init", "-q", cwd=repo)
    run_cli("dvc", "remote", "add", "-d", "local", str(repo.parent / "remote"), cwd=repo)
    first = run_cli("dvc", "repro", cwd=repo).stdout
    assert ran(first) == {"curate", "episodes"}
    return repo


def test_second_repro_does_nothing(repo):
    before = tree_digest(repo / "data")
    out = run_cli("dvc", "repro", cwd=repo).stdout
    assert ran(out) == set() and "didn't change, skipping" in out
    assert tree_digest(repo / "data") == before
    assert "up to date" in run_cli("dvc", "status", cwd=repo).stdout


def test_episode_param_reruns_only_episodes(repo):
    set_param(repo, "episodes", "meta_train_episodes", 120)
    assert ran(run_cli("dvc", "repro", cwd=repo).stdout) == {"episodes"}


def test_curation_param_reruns_curate_and_what_depends_on_it(repo):
    set_param(repo, "curation", "max_chars", 150)  # the corpus has longer texts: output changes
    out = run_cli("dvc", "repro", cwd=repo).stdout
    assert ran(out) == {"curate", "episodes"}
    stats = yaml.safe_load((repo / "data" / "curated" / "stats.json").read_text())
    assert stats["by_reason"].get("too_long", 0) > 0


def test_unrelated_param_reruns_nothing(repo):
    set_param(repo, "backbone", "max_length", 32)
    assert ran(run_cli("dvc", "repro", cwd=repo).stdout) == set()


def push_wipe_pull(repo: Path, *remote: str) -> None:
    before = tree_digest(repo / "data" / "curated"), tree_digest(repo / "data" / "episodes")
    run_cli("dvc", "push", *remote, cwd=repo)
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "curated")
    shutil.rmtree(repo / "data" / "episodes")
    run_cli("dvc", "pull", *remote, cwd=repo)
    assert (tree_digest(repo / "data" / "curated"), tree_digest(repo / "data" / "episodes")) == before


def test_push_and_pull_through_the_local_remote(repo):
    push_wipe_pull(repo)


def test_push_and_pull_through_an_s3_remote(repo, s3_bucket, moto_s3):
    _, bucket = s3_bucket
    run_cli("dvc", "remote", "add", "s3", f"s3://{bucket}/dvc", cwd=repo)
    # The endpoint (and any credentials) go to .dvc/config.local, which git ignores.
    run_cli("dvc", "remote", "modify", "--local", "s3", "endpointurl", moto_s3, cwd=repo)
    assert "endpointurl" not in (repo / ".dvc" / "config").read_text()
    push_wipe_pull(repo, "-r", "s3")
