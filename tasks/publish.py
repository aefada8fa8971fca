"""Tasks around the registry: the plan (what is stale), MLflow runs, register + promote,
and the report (Prefect artifacts + MLflow artifact)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlflow import MlflowClient
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from metaloop.config import Params
from metaloop.curate import CURATED, QUARANTINE, STATS
from metaloop.episode_sets import MANIFEST
from metaloop.promotion import Beats, NoNaN
from metaloop.fingerprint import Fingerprint
from tasks import plan, registry, tracking
from tasks.data import DataVersion
from tasks.domain import DomainOutcome
from tasks.retry import IO_RETRIES
from tasks.stages import Stage, inject
from tasks.tracking import TAG


def lineage(params: Params, data: DataVersion) -> dict[str, str]:
    """What the whole run was made from: the DVC data hash, all params, the code."""
    return {"data_hash": data.data_hash, "params_hash": tracking.params_hash(params), "code_version": plan.code_version()}


@task(name="plan-what-is-stale", **IO_RETRIES)
def plan_task(params: Params, data: DataVersion, force: bool = False, only: list[str] | None = None) -> plan.Plan:
    """Which models to retrain and why (tasks/plan.py); logged one line a model."""
    p = plan.make_plan(params, data.manifest, force=force, only=only)
    logger = get_run_logger()
    for line in p.lines():
        logger.info(line)
    return p


@task(name="open-mlflow-runs", **IO_RETRIES)
def open_runs_task(params: Params, data: DataVersion, fp: dict[str, str], c: MlflowClient,
                   meta: bool = True) -> dict[str, str]:
    """Parent run (all params, lineage) with children for curation and, when the init is
    retrained, meta-training."""
    exp = tracking.experiment_id(c, params.registry.experiment)
    lineage = {TAG + k: v for k, v in fp.items()} | {
        TAG + "git_commit": tracking.git_commit(), TAG + "eval_hash": data.eval_hash,
    }
    parent = tracking.start_run(c, exp, f"retrain {time.strftime('%Y-%m-%d %H:%M')}", tags=lineage)
    tracking.log_params(c, parent, params)
    curate = tracking.start_run(c, exp, "curate", parent=parent, tags=lineage)
    curated_dir = Path(params.curation.output_dir)
    stats = data.stats
    tracking.log_metrics(c, curate, {"rows_in": stats["rows_in"], "rows_kept": stats["rows_kept"],
                                     "rows_quarantined": stats["rows_quarantined"],
                                     **{f"quarantined_{k}": v for k, v in stats["by_reason"].items()}})
    c.log_artifact(curate, str(curated_dir / STATS))
    c.log_artifact(curate, str(curated_dir / QUARANTINE))
    c.log_artifact(curate, str(Path(params.episodes.output_dir) / MANIFEST))
    try:
        md5 = tracking.dvc_out_md5("curate")
        tracking.log_dataset(c, curate, curated_dir / CURATED, "curated", md5, tracking.dvc_remote_url())
        tracking.log_dataset(c, parent, curated_dir / CURATED, "curated", md5, tracking.dvc_remote_url())
    except Exception as err:  # lineage is best effort when not run inside a DVC repo
        get_run_logger().warning("could not log the dataset's DVC location: %s", err)
    c.set_terminated(curate)
    runs = {"parent": parent, "curate": curate, "experiment": exp}
    if meta:
        runs["meta"] = tracking.start_run(c, exp, "meta-train", parent=parent, tags=lineage)
    return runs


@task(name="fetch-meta-init", **IO_RETRIES)
def fetch_init_task(params: Params, c: MlflowClient, version: str) -> Path:
    """The registered init the domains adapt from when it is not retrained in this run."""
    name = registry.model_name(params.registry.prefix, plan.META)
    return registry.download_init(c, name, version, Path(params.meta.output_dir) / "registered")


def _version_tags(fp: dict[str, str], eval_hash: str, recipe: str, parent: str) -> dict[str, str]:
    """Lineage: what the version was made from (written when the version is created)."""
    return {**{TAG + k: v for k, v in fp.items()}, TAG + "git_commit": tracking.git_commit(),
            TAG + "eval_hash": eval_hash, TAG + "recipe": recipe, TAG + "parent_run_id": parent}


def _claims(model_fp: Fingerprint, metrics: dict, correct: str | None = None) -> dict[str, str]:
    """What the version's evaluation found, and the fingerprint that makes it count as done."""
    return {TAG + "metrics": json.dumps(registry.rounded(metrics)), **({TAG + "correct": correct} if correct else {}),
            **model_fp.tags()}


@task(name="register-meta", **IO_RETRIES)
def register_meta_task(params: Params, data: DataVersion, fp: dict, model_fp: Fingerprint, c: MlflowClient,
                       runs: dict, meta) -> dict:
    """The meta-learned init becomes `<prefix>-meta`; champion if its meta-val accuracy wins."""
    s = meta.summary
    metrics = {"accuracy": 100 * s["best_val_acc"]} if s.get("best_val_acc") is not None else {}
    registry.upload_artifacts(c, runs["meta"], str(meta.model_dir), "meta_model")
    metrics_file = Path(meta.model_dir).parent / "metrics.jsonl"
    if metrics_file.is_file():
        from tasks.plots import meta_curves

        c.log_figure(runs["meta"], meta_curves(metrics_file), "plots/meta_curves.png")
    manifest = json.loads((Path(params.episodes.output_dir) / MANIFEST).read_text())
    name = registry.model_name(params.registry.prefix, "meta")
    version = registry.register_version(
        c, name, f"runs:/{runs['meta']}/meta_model", runs["meta"],
        _version_tags(fp, manifest["files"]["meta_val.jsonl"], params.meta.algorithm, runs["parent"]),
        description="meta-learned encoder initialisation (AutoModel folder + metaloop_head.json)",
        claims=_claims(model_fp, metrics),
    )
    c.set_terminated(runs["meta"])
    decision = registry.promote(c, name, version, NoNaN() & Beats("accuracy", params.promotion.margin))
    return {"version": version, "promoted": decision.promote, "reasons": list(decision.reasons)}


@task(name="register-and-promote", **IO_RETRIES)
def register_and_promote_task(outcome: DomainOutcome, params: Params, data: DataVersion, fp: dict,
                              model_fp: Fingerprint, c: MlflowClient, runs: dict) -> DomainOutcome:
    """Register the domain's model, then promote it if the policy allows. A failure is
    raised as `StageFailed` ("registration: ..." or "promotion: ..."); the flow records it
    for this domain and goes on with the others."""
    if outcome.error or outcome.action != "retrained":
        return outcome
    stage = Stage(outcome.domain)
    try:
        stage("registration")
        name = registry.model_name(params.registry.prefix, outcome.domain)
        source = registry.log_classifier(c, outcome.run_id, Path(outcome.classifier_dir))
        eval_hash = data.eval_hash_by_domain[outcome.domain]
        outcome.version = registry.register_version(
            c, name, source, outcome.run_id, _version_tags(fp, eval_hash, outcome.recipe, runs["parent"]),
            description=f"few-shot intent classifier for {outcome.domain}",
            claims=_claims(model_fp, outcome.metrics, outcome.correct),
            after_create=lambda: inject(outcome.domain, "version-created"),
        )
        c.set_terminated(outcome.run_id)
        if outcome.champion_scores:
            s = outcome.champion_scores
            registry.record_scores(c, name, s["version"], eval_hash, s["metrics"], s["correct"])
        stage("promotion")
        decision = registry.promote(c, name, outcome.version, params.promotion.policy())
    except Exception as err:
        if outcome.run_id:
            _fail_run(c, outcome.run_id)
        raise stage.failed(err) from err
    outcome.promoted, outcome.reasons = decision.promote, list(decision.reasons)
    outcome.champion = registry._alias(c, name, registry.CHAMPION)
    return outcome


@task(name="promote-pending", **IO_RETRIES)
def promote_pending_task(domain: str, version: str, params: Params, c: MlflowClient) -> DomainOutcome:
    """A registered challenger whose promotion never ran (it failed or the run died): decide now."""
    name = registry.model_name(params.registry.prefix, domain)
    stage = Stage(domain)
    try:
        stage("promotion")
        decision = registry.promote(c, name, version, params.promotion.policy())
    except Exception as err:
        raise stage.failed(err) from err
    return DomainOutcome(domain=domain, action="promotion retried", why=f"v{version} was registered, never decided",
                         version=version, promoted=decision.promote, reasons=list(decision.reasons),
                         champion=registry._alias(c, name, registry.CHAMPION))


def _fail_run(c: MlflowClient, run_id: str) -> None:
    try:
        if c.get_run(run_id).info.status == "RUNNING":
            c.set_terminated(run_id, "FAILED")
    except Exception:  # best effort: the tracking server may be what failed
        pass


def decision_text(o: DomainOutcome) -> str:
    """One domain's line in the report and the CLI table: retrained (and the promotion
    decision), skipped and why, or failed and where."""
    if o.error:
        return f"failed: {o.error}"
    if o.action != "retrained":
        return f"{o.action} ({o.why})"
    return f"retrained ({o.why}); {'promoted' if o.promoted else 'kept champion'}: {'; '.join(o.reasons)}"


def report_markdown(summary) -> str:
    lines = [
        f"# metaloop retrain: {summary.status}", "",
        f"data `{summary.lineage['data_hash']}` · params `{summary.lineage['params_hash']}` · "
        f"code `{summary.lineage['code_version']}` · MLflow run `{summary.parent_run_id}`", "",
        f"meta-learned init: {summary.meta.get('action', 'retrained')} ({summary.meta.get('why', '')}), "
        f"version {summary.meta.get('version')}", "",
        "| domain | acc. before adapt | after adapt | after compress | size MB | p50 ms | version | champion | decision |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in summary.domains:
        m = o.metrics
        f = lambda k: f"{m[k]:.1f}" if k in m else ""  # noqa: E731
        text = decision_text(o)
        lines.append(f"| {o.domain} | {f('accuracy_before')} | {f('accuracy_adapted')} | {f('accuracy')} | "
                     f"{f('size_mb')} | {f('p50_ms_batch1')} | {o.version or ''} | {o.champion or ''} | "
                     f"{'**' + text + '**' if o.error else text} |")
    for d in summary.removed:
        lines.append(f"| {d} | | | | | | | | removed from domains.target: no longer served by the flow "
                     "(its models stay in the registry) |")
    return "\n".join(lines) + "\n"


@task(name="publish-report", **IO_RETRIES)
def publish_report_task(summary, c: MlflowClient) -> str:
    inject("*", "report")
    md = report_markdown(summary)
    create_markdown_artifact(md, key="retrain-report", description="per-domain accuracy, size, latency, promotion")
    rows = [{"domain": o.domain, "action": "failed" if o.error else o.action, "why": o.why, "version": o.version,
             "champion": o.champion, "promoted": o.promoted, "error": o.error,
             **{k: round(v, 3) for k, v in o.metrics.items()}} for o in summary.domains]
    rows += [{"domain": d, "action": "removed", "why": "no longer in domains.target"} for d in summary.removed]
    create_table_artifact(rows, key="retrain-domains", description="one row per target domain")
    if summary.parent_run_id:
        c.log_text(summary.parent_run_id, md, "report.md")
        if any(not o.error and o.action == "retrained" for o in summary.domains):
            from tasks.plots import domain_accuracy

            c.log_figure(summary.parent_run_id, domain_accuracy(summary.domains), "plots/domain_accuracy.png")
        c.set_terminated(summary.parent_run_id, "FAILED" if summary.failed_domains() else "FINISHED")
    return md
