"""The main job: curate -> episodes -> meta-train -> per-domain adapt/compress/evaluate
-> register -> promote, with a report. This module only chains tasks.

    metaloop run [--force]          # or: python -m flows.retrain
    metaloop serve                  # the same flow on params' cron schedule

Skips everything ("nothing changed") when the data hash, params hash and code version
equal those recorded on the current champions, unless forced. One domain's failure does
not stop the others; the flow then ends Failed, naming the domain.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import Failed

from metaloop.config import Params, load_params
from tasks import tracking
from tasks.data import push_task, repro_task
from tasks.domain import DomainOutcome, domain_task
from tasks.meta_train import meta_train_task
from tasks.publish import (
    fingerprint_task,
    open_runs_task,
    publish_report_task,
    register_and_promote_task,
    register_meta_task,
    unchanged_task,
)


@dataclass
class RetrainSummary:
    status: str  # "trained", "nothing changed" or "failed: <domains>"
    fingerprint: dict[str, str]
    parent_run_id: str | None = None
    meta: dict = field(default_factory=dict)
    domains: list[DomainOutcome] = field(default_factory=list)

    def failed_domains(self) -> list[str]:
        return [d.domain for d in self.domains if d.error]


@flow(name="metaloop-retrain", log_prints=True)
def retrain(params_path: str = "params.yaml", force: bool = False) -> RetrainSummary:
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking.DEFAULT_URI)
    logger = get_run_logger()
    params: Params = load_params(params_path)
    data = repro_task(params)
    fp = fingerprint_task(params, data)
    if not force and unchanged_task(params, fp):
        logger.info("nothing changed since the current champions (data, params, code); use --force to retrain")
        return RetrainSummary(status="nothing changed", fingerprint=fp)
    if tracking.dvc_remote_url():
        push_task()
    else:
        logger.warning("no default DVC remote: curated data is versioned in dvc.lock but not pushed")

    c = tracking.client()
    runs = open_runs_task(params, data, fp, c)
    try:
        meta = meta_train_task(params, Path(params_path), c, runs["meta"])
        meta_registered = register_meta_task(params, data, fp, c, runs, meta)

        futures = [
            domain_task.submit(domain, params, meta.model_dir, data, c, runs["parent"])
            for domain in sorted(params.domains.target)
        ]
        outcomes = [domain_task_result(f, d) for f, d in zip(futures, sorted(params.domains.target))]
        # Registry writes run one at a time: they are cheap, and SQLite stores dislike concurrency.
        outcomes = [register_and_promote_task(o, params, data, fp, c, runs, meta) for o in outcomes]

        failed = [o.domain for o in outcomes if o.error]
        summary = RetrainSummary(
            status=f"failed: {', '.join(failed)}" if failed else "trained",
            fingerprint=fp, parent_run_id=runs["parent"], meta={**meta.summary, **meta_registered}, domains=outcomes,
        )
        publish_report_task(summary, c)
    except BaseException:
        _close_runs(c, runs)  # MLflow shows FAILED runs, not runs RUNNING forever
        raise
    if failed:
        errors = "; ".join(f"{o.domain}: {o.error}" for o in outcomes if o.error)
        return Failed(message=f"domain(s) {', '.join(failed)} failed ({errors}); the others were registered", data=summary)
    return summary


def _close_runs(c, runs: dict) -> None:
    for key in ("meta", "parent"):
        try:
            if c.get_run(runs[key]).info.status == "RUNNING":
                c.set_terminated(runs[key], "FAILED")
        except Exception:  # best effort: the tracking server itself may be what failed
            pass


def domain_task_result(future, domain: str) -> DomainOutcome:
    """A domain's outcome, or its error: one domain failing must not sink the rest."""
    future.wait()
    if future.state.is_completed():
        return future.result()
    err = future.state.result(raise_on_failure=False)
    return DomainOutcome(domain=domain, error=f"{type(err).__name__}: {err}")


def run(params_path: str = "params.yaml", force: bool = False) -> RetrainSummary:
    """Run the flow with the task runner params ask for; return the summary even on failure."""
    params = load_params(params_path)
    state = retrain.with_options(task_runner=task_runner(params))(params_path, force, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result  # a failure before the domains ran (bad params or data, meta-training): no summary
    return result


def task_runner(params: Params):
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    kind, workers = params.flow.task_runner, params.flow.max_workers
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "processes":
        return ProcessPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner  # pip install prefect-dask

        return DaskTaskRunner(address=params.flow.address) if params.flow.address else DaskTaskRunner()
    from prefect_ray import RayTaskRunner  # pip install prefect-ray

    return RayTaskRunner(address=params.flow.address)


if __name__ == "__main__":
    import sys

    print(asdict(run(*(sys.argv[1:2] or ["params.yaml"]))))
