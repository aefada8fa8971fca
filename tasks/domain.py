"""Per-domain task: adapt from the meta-learned init, compress, evaluate, log to MLflow.

One MLflow child run per domain holds the metrics of every stage (before adaptation,
adapted fp32, each compression recipe). The flow fans this task out over target domains;
a domain's failure is its own (the flow records it and carries on with the others).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from prefect import get_run_logger, task

from metaloop.adapt import Examples, adapt_domain, centroid_accuracy, eval_labels_by_domain
from metaloop.compress import compress
from metaloop.config import Params
from metaloop.curate import CURATED
from metaloop.episode_sets import EVAL
from metaloop.episodes import Pool, read_manifest
from metaloop.evaluate import evaluate
from metaloop.names import under
from tasks import registry, tracking
from tasks.stages import Stage, inject


@dataclass
class DomainOutcome:
    domain: str
    action: str = "retrained"  # or "skipped": nothing it is built from changed (`why` says so)
    why: str = ""
    error: str | None = None
    run_id: str | None = None
    classifier_dir: str | None = None
    recipe: str = "fp32"
    metrics: dict[str, float] = field(default_factory=dict)
    correct: str | None = None  # per-query outcomes of the registered model (promotion.outcome_record)
    champion_scores: dict | None = None  # the champion re-scored on these episodes (registry.record_scores)
    version: str | None = None
    champion: str | None = None
    promoted: bool = False
    reasons: list[str] = field(default_factory=list)


def _split(table: pd.DataFrame, domain: str, split: str) -> Examples:
    rows = table[(table["domain"] == domain) & (table["split"] == split)]
    return Examples(rows["text"].tolist(), rows["label"].tolist())




@task(name="adapt-compress-evaluate", task_run_name="adapt-{domain}")
def domain_task(domain: str, params: Params, init: Path, data, parent: str) -> DomainOutcome:
    """Its own MLflow client: under Dask or processes the task runs in another process."""
    import torch

    logger = get_run_logger()
    c = tracking.client()
    exp = tracking.experiment_id(c, params.registry.experiment)
    worker = {"metaloop.domain": domain, "metaloop.worker": f"{socket.gethostname()}:{os.getpid()}",
              "metaloop.torch_threads": str(torch.get_num_threads())}
    run = tracking.start_run(c, exp, f"domain {domain}", parent=parent, tags=worker)
    stage = Stage(domain)
    try:
        return _adapt_compress_evaluate(domain, params, Path(init), data, c, run, logger, stage)
    except Exception as err:
        c.set_terminated(run, "FAILED")
        c.set_tag(run, "metaloop.failed_stage", stage.name)
        raise stage.failed(err) from err


def _adapt_compress_evaluate(domain, params: Params, init: Path, data, c, run, logger,
                             stage: Stage | None = None) -> DomainOutcome:
    stage = stage or Stage(domain)
    stage("data")
    table = pd.read_parquet(Path(params.curation.output_dir) / CURATED)
    pool = Pool(table)
    episodes = [e for e in read_manifest(Path(params.episodes.output_dir) / EVAL) if e.domain == domain]
    labels = eval_labels_by_domain(episodes)[domain]
    max_length, seed = params.backbone.max_length, params.seed
    train, test = _split(table, domain, "train"), _split(table, domain, "test")
    eval_hash = data.eval_hash_by_domain[domain]

    out = under(Path(params.adapt.output_dir), domain)
    stage("adaptation")
    adapted = adapt_domain(init, table, domain, params.adapt, out / "fp32", eval_labels=labels,
                           max_length=max_length, seed=seed, centroids=params.meta.centroids(),
                           pooling=params.backbone.pooling)  # first: it checks the domain's labels
    # Before adaptation: the init's own embedding (the one meta-training shapes) + centroids.
    before = 100.0 * centroid_accuracy(init, train, test, labels, max_length, params.backbone.pooling,
                                       params.meta.centroids())
    tracking.log_metrics(c, run, {"accuracy_before": before, **adapted.metrics()})

    records: dict[str, str | None] = {}

    def score(model_dir: Path, recipe: str, timing: bool = True) -> dict[str, float]:
        result = evaluate(model_dir, domain=domain, recipe=recipe, test=test, episodes=episodes,
                          texts_of=pool.texts, eval_hash=eval_hash, seq_len=max_length, timing=timing)
        c.log_dict(run, result.to_dict(), f"eval/{recipe}.json")
        records[recipe] = result.correct
        return result.metrics()

    stage("evaluation")
    fp32 = score(out / "fp32", "fp32")
    tracking.log_metrics(c, run, {f"fp32.{k}": v for k, v in fp32.items()})
    logger.info("%s: accuracy %.1f before adaptation, %.1f after", domain, before, fp32.get("accuracy", float("nan")))

    chosen, chosen_dir, chosen_metrics = "fp32", out / "fp32", fp32
    for recipe in params.compress.recipes:
        stage("compression")
        result = compress(out / "fp32", under(out, recipe), recipe, params.compress, train=train,
                          max_length=max_length, seed=seed)
        stage("evaluation")
        metrics = {**score(out / recipe, recipe), **result.metrics()}
        tracking.log_metrics(c, run, {f"{recipe}.{k}": v for k, v in metrics.items()})
        logger.info("%s/%s: accuracy %.1f, %.1f MB, p50 %.1f ms", domain, recipe, metrics.get("accuracy", float("nan")),
                    metrics["size_mb"], metrics["p50_ms_batch1"])
        if recipe == params.registry.recipe:
            chosen, chosen_dir, chosen_metrics = recipe, out / recipe, metrics

    summary = {**chosen_metrics, "accuracy_before": before, "accuracy_adapted": fp32.get("accuracy", float("nan"))}
    tracking.log_metrics(c, run, {k: v for k, v in summary.items() if k in ("accuracy", "size_mb", "p50_ms_batch1")})
    c.set_tag(run, "metaloop.recipe", chosen)
    c.log_text(run, json.dumps(summary, indent=2), "summary.json")
    champion_scores = _rescore_champion(c, registry.model_name(params.registry.prefix, domain), eval_hash,
                                        score, records, logger, domain)
    return DomainOutcome(domain=domain, run_id=run, classifier_dir=str(chosen_dir), recipe=chosen, metrics=summary,
                         correct=records[chosen], champion_scores=champion_scores)


def _rescore_champion(c: MlflowClient, name: str, eval_hash: str, score, records: dict, logger,
                      domain: str = "") -> dict | None:
    """Score the champion on this run's episodes when it was scored on others (its domain's
    data changed) or kept no per-query record, so promotion compares like with like.
    Best effort: on failure, promotion refuses the comparison and says why."""
    version = registry.champion_to_rescore(c, name, eval_hash)
    if version is None:
        return None
    recipe = f"champion-v{version}"
    try:
        inject(domain, "rescoring")
        with tempfile.TemporaryDirectory() as tmp:
            # accuracy only: promotion compares the champion's accuracy, never its latency
            metrics = score(registry.download_classifier(c, name, version, Path(tmp)), recipe, timing=False)
    except Exception as err:  # an old champion's format, a missing artifact: keep the run going
        logger.warning("%s: could not re-score champion v%s on the current episodes: %s", name, version, err)
        return None
    logger.info("%s: champion v%s re-scored on the current episodes: accuracy %.1f", name, version,
                metrics.get("accuracy", float("nan")))
    return {"version": version, "metrics": metrics, "correct": records[recipe]}
