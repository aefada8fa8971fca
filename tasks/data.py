"""Data tasks: run the DVC stages (curate, episodes), push them, report their versions.

DVC holds a repository lock and a parallel `dvc repro` fails with "Unable to acquire
lock", so every DVC call in this process goes through `tracking.dvc` (one lock), and the
flow calls these tasks sequentially. A stage whose deps and params are unchanged is skipped by DVC.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from prefect import get_run_logger, task

from metaloop.config import Params
from metaloop.curate import STATS
from metaloop.episode_sets import MANIFEST
from metaloop.errors import DataError
from tasks.retry import IO_RETRIES
from tasks.tracking import dvc, dvc_data_hash

@dataclass
class DataVersion:
    data_hash: str
    eval_hash: str
    eval_hash_by_domain: dict[str, str]
    stats: dict = field(repr=False)
    manifest: dict = field(default_factory=dict, repr=False)  # manifest.json: per-domain hashes
    stages_run: list[str] = field(default_factory=list)


def repro(params: Params, root: Path = Path(".")) -> DataVersion:
    """`dvc repro` the data stages; a data or params error surfaces with the library's message."""
    proc = dvc("repro", cwd=root)
    if proc.returncode != 0:
        # The stage's own stderr carries metaloop's message (file, row, fix); keep it whole.
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        msg = next((ln.removeprefix("error: ") for ln in lines if ln.startswith("error: ")), "\n".join(lines[-15:]))
        raise DataError(f"dvc repro failed: {msg}")
    ran = [s for s in ("curate", "episodes") if f"Running stage '{s}'" in proc.stdout]
    manifest = json.loads((root / params.episodes.output_dir / MANIFEST).read_text())
    return DataVersion(
        data_hash=dvc_data_hash(root / "dvc.lock"),
        eval_hash=manifest["eval_hash"],
        eval_hash_by_domain=manifest["eval_hash_by_domain"],
        stats=json.loads((root / params.curation.output_dir / STATS).read_text()),
        manifest=manifest,
        stages_run=ran,
    )


def push(root: Path = Path("."), remote: str | None = None) -> None:
    proc = dvc("push", *(["-r", remote] if remote else []), cwd=root)
    if proc.returncode != 0:
        raise OSError(f"dvc push failed (will retry): {proc.stderr.strip()[-800:]}")


@task(name="curate-and-build-episodes")
def repro_task(params: Params, root: Path = Path(".")) -> DataVersion:
    """Not retried: a bad source or parameter fails at once with the library's message."""
    version = repro(params, root)
    get_run_logger().info(
        "data %s (stages run: %s); %d rows kept, %d quarantined",
        version.data_hash, ", ".join(version.stages_run) or "none, unchanged",
        version.stats["rows_kept"], version.stats["rows_quarantined"],
    )
    return version


@task(name="dvc-push", **{**IO_RETRIES, "retries": 3})
def push_task(root: Path = Path("."), remote: str | None = None) -> None:
    push(root, remote)
