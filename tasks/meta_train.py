"""Meta-training task: run `torchrun ... -m metaloop.train` as a subprocess.

Its output streams into Prefect's log line by line, progress goes to a Prefect progress
artifact, and rank 0's metrics.jsonl (already reduced over ranks) is logged to the meta
run in MLflow with steps. A retry simply starts torchrun again: metaloop.train resumes
from its last checkpoint. Bad params or data are caught by `preflight` before launching
(torchrun's exit status cannot tell them from a crash) and are not retried.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.tasks import exponential_backoff

from metaloop.config import Params
from metaloop.launch import ERROR_FILE_ENV, raise_rank_error, torchrun_command, torchrun_env
from metaloop.train_inputs import preflight
from tasks.retry import healable
from tasks.tracking import log_metrics


@dataclass
class MetaResult:
    model_dir: Path
    summary: dict


class MetaTrainingFailed(RuntimeError):
    """torchrun exited non-zero for a reason a retry may fix (killed rank, OOM, preemption)."""


def _not_user_error(task, task_run, state) -> bool:
    """Retry a crashed torchrun (killed rank, OOM, preemption) and healable I/O; never bad input:
    the same params would fail the same way."""
    try:
        state.result()
    except MetaTrainingFailed:
        return True
    except BaseException as err:  # noqa: BLE001 - classify whatever the task raised
        return healable(err)
    return False


def _logged_until(c: MlflowClient, run_id: str) -> int:
    """The last step already in MLflow (an earlier attempt of this task may have logged some)."""
    history = c.get_metric_history(run_id, "train_loss")
    return max((m.step for m in history), default=0)


def _log_new_metrics(c: MlflowClient, run_id: str, path: Path, last: int) -> int:
    """Log metrics.jsonl records with a step after `last`; return the last step logged.

    Steps, not line counts: a resumed run cuts metrics.jsonl back to its checkpoint and
    replays the same steps exactly, so what MLflow already has is skipped.
    """
    if not path.is_file():
        return last
    for line in path.read_text().splitlines():
        record = json.loads(line)
        step = int(record.pop("step"))
        if step <= last:
            continue
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numeric:
            log_metrics(c, run_id, numeric, step=step)
        last = step
    return last


@task(name="meta-train", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5),
      retry_condition_fn=_not_user_error)
def meta_train_task(params: Params, params_path: Path, c: MlflowClient, run_id: str) -> MetaResult:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logger = get_run_logger()
    preflight(params)  # bad params or data fail here, with the message; torchrun's exit code can't tell
    out = Path(params.meta.output_dir)
    metrics_file = out / "metrics.jsonl"
    last = _logged_until(c, run_id)
    progress = create_progress_artifact(progress=0.0, key="meta-training", description="meta-training steps done (%)")
    # No tqdm bars: each redraw would become a Prefect log line.
    env = torchrun_env(params, {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    cmd = torchrun_command(params, params_path)
    error_file = Path(env[ERROR_FILE_ENV])
    error_file.unlink(missing_ok=True)  # a rank writes its MetaloopError here and stops the job
    logger.info("launching: %s", " ".join(cmd))
    monitor = SystemMetricsMonitor(run_id, sampling_interval=5, samples_before_logging=1)
    monitor.start()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
        tail: list[str] = []
        for line in proc.stdout:
            line = line.rstrip()
            logger.info(line)
            tail = (tail + [line])[-20:]
            step = _log_new_metrics(c, run_id, metrics_file, last)
            if step != last:
                last = step
                update_progress_artifact(progress, min(100.0, 100.0 * step / params.meta.steps))
        code = proc.wait()
    finally:
        monitor.finish()
    _log_new_metrics(c, run_id, metrics_file, last)
    raise_rank_error(error_file)  # bad params or data: its message, and no retry
    if code != 0:
        raise MetaTrainingFailed(f"torchrun exited {code}; a retry resumes from the last checkpoint\n" + "\n".join(tail[-5:]))
    update_progress_artifact(progress, 100.0)
    # No artifact uploads here: they go to the artifact store (S3), which may be down, and a
    # failed upload must retry the upload, not an hour of training. register-meta does them.
    summary = json.loads((out / "summary.json").read_text())
    return MetaResult(model_dir=out / "model", summary=summary)
