"""The main job: curate -> episodes -> plan -> meta-train -> per-domain adapt/compress/evaluate
-> register -> promote, with a report. This module only chains tasks.

    metaloop run [--force] [--domain D]   # or: python -m flows.retrain
    metaloop serve                        # the same flow on params' cron schedule

Retrains only what is stale (tasks/plan.py): each model's fingerprint (its own rows,
episodes, params, code, and for a domain the init version) against the one on its
champion. An unchanged init is fetched from the registry; unchanged domains are reported
as skipped. One domain's failure does not stop the others; the flow then ends Failed,
naming the domain.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import Failed

from metaloop.config import Params, load_params
from metaloop.fingerprint import domain_fingerprint
from metaloop.runlock import run_lock
from tasks import tracking
from tasks.data import push_task, repro_task
from tasks.domain import DomainOutcome, domain_task
from tasks.meta_train import meta_train_task
from tasks.plan import Plan
from tasks.publish import (
    fetch_init_task,
    lineage,
    open_runs_task,
    plan_task,
    promote_pending_task,
    publish_report_task,
    register_and_promote_task,
    register_meta_task,
)
from tasks.stages import StageFailed


@dataclass
class RetrainSummary:
    status: str  # "trained", "nothing changed" or "failed: <domains>"
    lineage: dict[str, str]
    parent_run_id: str | None = None
    meta: dict = field(default_factory=dict)
    domains: list[DomainOutcome] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # registered, no longer in domains.target
    report_error: str | None = None

    def failed_domains(self) -> list[str]:
        return [d.domain for d in self.domains if d.error]


@flow(name="metaloop-retrain", log_prints=True)
def retrain(params_path: str = "params.yaml", force: bool = False, domains: list[str] | None = None) -> RetrainSummary:
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking.DEFAULT_URI)
    from prefect.runtime import flow_run

    # One run at a time per project: a second one stops here, before writing anything.
    with run_lock(Path("."), f"flow run {flow_run.get_name()!r} ({flow_run.get_id()})"):
        return _retrain(params_path, force, domains)


def _retrain(params_path: str, force: bool, domains: list[str] | None):
    logger = get_run_logger()
    params: Params = load_params(params_path)
    data = repro_task(params)
    fp = lineage(params, data)
    plan: Plan = plan_task(params, data, force, domains)
    if plan.nothing_to_do:
        logger.info("nothing changed: every model is up to date with its data, params and code; --force retrains")
        return RetrainSummary(status="nothing changed", lineage=fp, domains=_skipped(plan), removed=plan.removed)
    if tracking.dvc_remote_url():
        push_task()
    else:
        logger.warning("no default DVC remote: curated data is versioned in dvc.lock but not pushed")

    c = tracking.client()
    runs = open_runs_task(params, data, fp, c, meta=plan.meta.retrain)
    try:
        if plan.meta.retrain:
            meta = meta_train_task(params, Path(params_path), c, runs["meta"])
            registered = register_meta_task(params, data, fp, plan.meta.fingerprint, c, runs, meta)
            init, init_version = meta.model_dir, registered["version"]
            meta_summary = {**meta.summary, **registered, "action": "retrained", "why": plan.meta.why}
        else:
            init_version = plan.meta.version
            init = fetch_init_task(params, c, init_version)
            meta_summary = {"version": init_version, "action": "skipped", "why": plan.meta.why}

        stale = plan.stale_domains()
        futures = [domain_task.submit(d, params, init, data, runs["parent"]) for d in stale]
        outcomes = [domain_task_result(f, d) for f, d in zip(futures, stale)]
        code = plan.meta.fingerprint.parts["code"]  # hashed once, by the plan
        for o in outcomes:
            o.why = next(m.why for m in plan.domains if m.name == o.domain)
        # Registry writes run one at a time: they are cheap, and SQLite stores dislike concurrency.
        # Each domain's registration and promotion is its own: a failure is recorded for it alone.
        outcomes = [_isolated(register_and_promote_task, o, o, params, data, fp,
                              domain_fingerprint(params, data.manifest, o.domain, init_version, code), c, runs)
                    for o in outcomes]
        pending = [m for m in plan.domains if m.promotion_pending and m.name not in stale]
        outcomes += [_isolated(promote_pending_task, DomainOutcome(m.name, why=m.why, version=m.version),
                               m.name, m.version, params, c) for m in pending]
        done = {o.domain: o for o in outcomes}
        outcomes = [done.get(s.domain, s) for s in _skipped(plan)]

        failed = [o.domain for o in outcomes if o.error]
        summary = RetrainSummary(
            status=f"failed: {', '.join(failed)}" if failed else "trained", lineage=fp,
            parent_run_id=runs["parent"], meta=meta_summary, domains=outcomes, removed=plan.removed,
        )
        report = publish_report_task(summary, c, return_state=True)
        if not report.is_completed():
            err = report.result(raise_on_failure=False)
            summary.report_error = f"report: {type(err).__name__}: {err}"
            summary.status = f"failed: {', '.join([*failed, 'report'])}"
            _close_runs(c, runs)  # the report task ends the parent run; it did not get there
    except BaseException:
        _close_runs(c, runs)  # MLflow shows FAILED runs, not runs RUNNING forever
        raise
    if failed or summary.report_error:
        errors = "; ".join([*(f"{o.domain}: {o.error}" for o in outcomes if o.error), *filter(None, [summary.report_error])])
        who = f"domain(s) {', '.join(failed)} failed" if failed else "the report failed"
        return Failed(message=f"{who} ({errors}); the others were registered", data=summary)
    return summary


def _isolated(task, fallback: DomainOutcome, *args) -> DomainOutcome:
    """Run one domain's registry task; its failure becomes that domain's error, not the flow's."""
    state = task(*args, return_state=True)
    if state.is_completed():
        return state.result()
    fallback.error = _error_text(state.result(raise_on_failure=False))
    return fallback


def _error_text(err: BaseException) -> str:
    return str(err) if isinstance(err, StageFailed) else f"{type(err).__name__}: {err}"


def _skipped(plan: Plan) -> list[DomainOutcome]:
    """Every target domain as a skipped outcome with its registered version (the flow
    replaces the ones it retrains)."""
    return [DomainOutcome(domain=m.name, action="skipped", why=m.why, version=m.version, champion=m.champion)
            for m in plan.domains]


def _close_runs(c, runs: dict) -> None:
    for key in ("meta", "parent"):
        if key not in runs:
            continue
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
    return DomainOutcome(domain=domain, error=_error_text(future.state.result(raise_on_failure=False)))


def run(params_path: str = "params.yaml", force: bool = False, domains: list[str] | None = None) -> RetrainSummary:
    """Run the flow with the task runner params ask for; return the summary even on failure."""
    params = load_params(params_path)
    # Set before the task runner starts: Dask worker processes inherit the environment.
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking.DEFAULT_URI)
    state = retrain.with_options(task_runner=task_runner(params))(params_path, force, domains, return_state=True)
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
        from prefect_dask import DaskTaskRunner

        if params.flow.address:
            return DaskTaskRunner(address=params.flow.address)
        # One domain at a time per worker process (Dask threads), each with its share of the
        # cores for torch (set before the worker imports torch): workers x threads <= cores.
        threads = str(params.flow.worker_threads())
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
            "n_workers": workers, "threads_per_worker": 1, "processes": True, "env": env,
            "dashboard_address": None})
    raise ValueError(f"flow.task_runner {kind!r}: use threads, processes or dask")


if __name__ == "__main__":
    import sys

    print(asdict(run(*(sys.argv[1:2] or ["params.yaml"]))))
