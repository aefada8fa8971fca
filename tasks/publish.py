"""Tasks around the registry: fingerprint and skip check, MLflow runs, register + promote,
and the report (Prefect artifacts + MLflow artifact)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlflow import MlflowClient
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.tasks import exponential_backoff

from metaloop.config import Params
from metaloop.curate import CURATED, QUARANTINE, STATS
from metaloop.episode_sets import MANIFEST
from metaloop.promotion import Beats, NoNaN
from tasks import registry, skip, tracking
from tasks.data import DataVersion
from tasks.domain import DomainOutcome
from tasks.tracking import TAG

IO_RETRIES = dict(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5)


@task(name="fingerprint")
def fingerprint_task(params: Params, data: DataVersion) -> dict[str, str]:
    return skip.fingerprint(params, data.data_hash)


@task(name="unchanged-since-champions", **IO_RETRIES)
def unchanged_task(params: Params, fp: dict[str, str]) -> bool:
    """True when every model's champion (or the challenger that lost to it) has this fingerprint."""
    return skip.unchanged(params, fp)


@task(name="open-mlflow-runs", **IO_RETRIES)
def open_runs_task(params: Params, data: DataVersion, fp: dict[str, str], c: MlflowClient) -> dict[str, str]:
    """Parent run (all params, lineage) with children for curation and meta-training."""
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
    meta = tracking.start_run(c, exp, "meta-train", parent=parent, tags=lineage)
    return {"parent": parent, "curate": curate, "meta": meta, "experiment": exp}


def _version_tags(fp: dict[str, str], eval_hash: str, recipe: str, parent: str, metrics: dict,
                  correct: str | None = None) -> dict[str, str]:
    return {
        **{TAG + k: v for k, v in fp.items()},
        TAG + "git_commit": tracking.git_commit(), TAG + "eval_hash": eval_hash, TAG + "recipe": recipe,
        TAG + "parent_run_id": parent, TAG + "metrics": json.dumps(registry.rounded(metrics)),
        **({TAG + "correct": correct} if correct else {}),
    }


@task(name="register-meta", **IO_RETRIES)
def register_meta_task(params: Params, data: DataVersion, fp: dict, c: MlflowClient, runs: dict, meta) -> dict:
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
        _version_tags(fp, manifest["files"]["meta_val.jsonl"], params.meta.algorithm, runs["parent"], metrics),
        description="meta-learned encoder initialisation (AutoModel folder + metaloop_head.json)",
    )
    c.set_terminated(runs["meta"])
    decision = registry.promote(c, name, version, NoNaN() & Beats("accuracy", params.promotion.margin))
    return {"version": version, "promoted": decision.promote, "reasons": list(decision.reasons)}


@task(name="register-and-promote", **IO_RETRIES)
def register_and_promote_task(outcome: DomainOutcome, params: Params, data: DataVersion, fp: dict,
                              c: MlflowClient, runs: dict, meta) -> DomainOutcome:
    if outcome.error:
        return outcome
    name = registry.model_name(params.registry.prefix, outcome.domain)
    source = registry.log_classifier(c, outcome.run_id, Path(outcome.classifier_dir))
    eval_hash = data.eval_hash_by_domain[outcome.domain]
    tags = _version_tags(fp, eval_hash, outcome.recipe, runs["parent"], outcome.metrics, outcome.correct)
    outcome.version = registry.register_version(
        c, name, source, outcome.run_id, tags,
        description=f"few-shot intent classifier for {outcome.domain}",
    )
    c.set_terminated(outcome.run_id)
    if outcome.champion_scores:
        s = outcome.champion_scores
        registry.record_scores(c, name, s["version"], eval_hash, s["metrics"], s["correct"])
    decision = registry.promote(c, name, outcome.version, params.promotion.policy())
    outcome.promoted, outcome.reasons = decision.promote, list(decision.reasons)
    outcome.champion = registry._alias(c, name, registry.CHAMPION)
    return outcome


def report_markdown(summary) -> str:
    lines = [
        f"# metaloop retrain: {summary.status}", "",
        f"data `{summary.fingerprint['data_hash']}` · params `{summary.fingerprint['params_hash']}` · "
        f"code `{summary.fingerprint['code_version']}` · MLflow run `{summary.parent_run_id}`", "",
        "| domain | acc. before adapt | after adapt | after compress | size MB | p50 ms | version | champion | decision |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in summary.domains:
        if o.error:
            lines.append(f"| {o.domain} | | | | | | | | **failed**: {o.error} |")
            continue
        m = o.metrics
        f = lambda k: f"{m[k]:.1f}" if k in m else ""  # noqa: E731
        lines.append(f"| {o.domain} | {f('accuracy_before')} | {f('accuracy_adapted')} | {f('accuracy')} | "
                     f"{f('size_mb')} | {f('p50_ms_batch1')} | {o.version} | {o.champion} | "
                     f"{'promoted' if o.promoted else 'kept champion'}: {'; '.join(o.reasons)} |")
    return "\n".join(lines) + "\n"


@task(name="publish-report", **IO_RETRIES)
def publish_report_task(summary, c: MlflowClient) -> str:
    md = report_markdown(summary)
    create_markdown_artifact(md, key="retrain-report", description="per-domain accuracy, size, latency, promotion")
    rows = [{"domain": o.domain, "version": o.version, "champion": o.champion, "promoted": o.promoted,
             "error": o.error, **{k: round(v, 3) for k, v in o.metrics.items()}} for o in summary.domains]
    create_table_artifact(rows, key="retrain-domains", description="one row per target domain")
    if summary.parent_run_id:
        c.log_text(summary.parent_run_id, md, "report.md")
        if any(not o.error for o in summary.domains):
            from tasks.plots import domain_accuracy

            c.log_figure(summary.parent_run_id, domain_accuracy(summary.domains), "plots/domain_accuracy.png")
        c.set_terminated(summary.parent_run_id, "FAILED" if summary.failed_domains() else "FINISHED")
    return md
