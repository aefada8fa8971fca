"""Start meta-training under torchrun as params.meta says, and bring a rank's error back.

    python -m metaloop.train --params params.yaml --launch     # what `metaloop train` runs
    cmd, env = torchrun_command(params, "params.yaml"), torchrun_env(params)

`torchrun_command` builds the command line (nproc, nnodes, c10d rendezvous or --standalone,
restarts); `torchrun_env` the environment (threads per rank, the error file). A rank that
fails on bad params or data records its `MetaloopError` in that file and stops its agent
(`metaloop.train`); `raise_rank_error` raises it here with its message, so the caller gets
the cause instead of torchrun's exit status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from metaloop.config import Params, load_params
from metaloop.errors import MetaloopError

ERROR_FILE_ENV = "METALOOP_ERROR_FILE"  # where a rank records the MetaloopError that ended the job


def torchrun_command(params: Params, params_path: str | Path, *extra: str) -> list[str]:
    """The torchrun command line params.meta asks for (nproc, nnodes, rendezvous, restarts)."""
    m = params.meta
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(m.nnodes),
           "--nproc-per-node", str(m.nproc), "--max-restarts", str(m.max_restarts)]
    if m.rdzv_endpoint:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", m.rdzv_endpoint, "--rdzv-id", m.rdzv_id]
    else:
        cmd += ["--standalone"]
    return [*cmd, "-m", "metaloop.train", "--params", str(params_path), *extra]


def torchrun_env(params: Params, base: dict | None = None) -> dict:
    """The environment for `torchrun_command`: `base` (default os.environ) plus one thread per
    rank and, for a c10d rendezvous, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1. torch 2.13's shared
    agent store cannot take a replaced node: in the next round the survivor keeps its cached
    store address and never publishes it, so the new node's agent waits for it and both time
    out. Unshared, rank 0 publishes a fresh store address every round (see `metaloop.meta.dist`)."""
    env = {**(os.environ if base is None else base), "OMP_NUM_THREADS": str(params.meta.threads_per_rank),
           ERROR_FILE_ENV: str(Path(params.meta.output_dir).resolve() / "launch-error.json")}
    if params.meta.rdzv_endpoint:
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return env


def launch(params_path: str | Path, *extra: str) -> int:
    """Run meta-training under torchrun as params.meta describes; returns its exit status.
    A rank's MetaloopError ends the job at once and is raised here with its message."""
    params = load_params(params_path)
    cmd = torchrun_command(params, params_path, *extra)
    env = torchrun_env(params)
    error_file = Path(env[ERROR_FILE_ENV])
    error_file.unlink(missing_ok=True)
    code = subprocess.run(cmd, env=env, check=False).returncode
    raise_rank_error(error_file)
    return code


def raise_rank_error(error_file: Path) -> None:
    """Re-raise the MetaloopError a rank recorded in `error_file` (see `_end_the_job`)."""
    if not error_file.is_file():
        return
    from metaloop import errors

    record = json.loads(error_file.read_text())
    cls = getattr(errors, record.get("type", ""), None)
    cls = cls if isinstance(cls, type) and issubclass(cls, MetaloopError) else MetaloopError
    raise cls(f"meta-training rank {record.get('rank')}: {record['message']}")
