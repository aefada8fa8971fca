"""Adapt one target domain, or many, from an init: fit, save, record what was done.

    result = adapt_domain("artifacts/meta/model", table, "hospitality", params, "artifacts/adapted/hospitality")
    outcome = adapt_domains(init, table, ["hospitality", "veterinary_clinic"], params, "artifacts/adapted")
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from metaloop.errors import DataError
from metaloop.stage_params import AdaptParams
from metaloop.adapt.data import domain_data, read_table
from metaloop.adapt.fit import fit
from metaloop.adapt.folder import save_classifier

log = logging.getLogger("metaloop.adapt")


@dataclass
class AdaptResult:
    domain: str
    model_dir: str
    strategy: str
    labels: list[str]
    n_train: int
    n_val: int
    val_source: str
    val_accuracy: float | None  # best epoch's held-out accuracy
    epochs_run: int
    best_epoch: int
    stopped_early: bool
    learned_lrs: int
    trainable_params: int
    seconds: float

    def metrics(self) -> dict[str, float]:
        out = {"n_train": self.n_train, "n_val": self.n_val, "epochs_run": self.epochs_run,
               "best_epoch": self.best_epoch, "adapt_seconds": self.seconds}
        if self.val_accuracy is not None:
            out["val_accuracy"] = 100.0 * self.val_accuracy
        return out


def adapt_domain(
    init: str | Path,
    table: pd.DataFrame | str | Path,
    domain: str,
    params: AdaptParams,
    out_dir: str | Path | None = None,
    *,
    eval_labels: Sequence[str] | None = None,
    max_length: int = 64,
    seed: int = 13,
    centroids=None,
    pooling: str = "mean",
) -> AdaptResult:
    """Adapt and save one domain's classifier (default folder: params.output_dir / domain).

    `centroids` and `pooling` are `fit`'s (used when params.classifier is centroids)."""
    data = domain_data(table, domain, params, eval_labels=eval_labels, seed=seed)
    model, tokenizer, hist = fit(init, data.train, data.labels, params, val=data.val, max_length=max_length,
                                 seed=seed, centroids=centroids, pooling=pooling)
    out = Path(out_dir) if out_dir is not None else Path(params.output_dir) / domain
    best_val = hist.val_accuracy[hist.best_epoch - 1] if hist.val_accuracy else None
    if hist.soup_val_accuracy is not None:
        best_val = hist.soup_val_accuracy
    result = AdaptResult(
        domain=domain, model_dir=str(out), strategy=params.strategy, labels=data.labels,
        n_train=len(data.train), n_val=len(data.val) if data.val else 0, val_source=data.val_source,
        val_accuracy=best_val, epochs_run=hist.epochs_run, best_epoch=hist.best_epoch,
        stopped_early=hist.stopped_early, learned_lrs=hist.learned_lrs,
        trainable_params=hist.trainable_params, seconds=round(hist.seconds, 3),
    )
    save_classifier(model, tokenizer, out, {
        "recipe": "fp32", "steps": [], "domain": domain, "init": str(init), "max_length": max_length,
        "classifier": params.classifier,
        "adapt": params.model_dump(mode="json"), "history": asdict(hist), "seed": seed,
    })
    return result


@dataclass
class AdaptOutcome:
    results: dict[str, AdaptResult]
    errors: dict[str, str]  # domain -> the DataError's message

    @property
    def ok(self) -> bool:
        return not self.errors


def adapt_domains(
    init: str | Path,
    table: pd.DataFrame | str | Path,
    domains: Sequence[str],
    params: AdaptParams,
    out_root: str | Path | None = None,
    *,
    eval_labels: Mapping[str, Sequence[str]] | None = None,
    max_length: int = 64,
    seed: int = 13,
    centroids=None,
    pooling: str = "mean",
) -> AdaptOutcome:
    """Adapt every domain; a domain whose data is unusable is reported, and the others go on."""
    table = read_table(table)
    root = Path(out_root) if out_root is not None else Path(params.output_dir)
    outcome = AdaptOutcome({}, {})
    for domain in domains:
        try:
            outcome.results[domain] = adapt_domain(
                init, table, domain, params, root / domain,
                eval_labels=(eval_labels or {}).get(domain), max_length=max_length, seed=seed,
                centroids=centroids, pooling=pooling,
            )
        except DataError as err:
            log.warning("adapt: %s", err)
            outcome.errors[domain] = str(err)
    return outcome
