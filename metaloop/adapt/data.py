"""A domain's labelled rows, read from the curated table: `Examples`, `DomainData`.

    data = domain_data("data/curated/curated.parquet", "hospitality", AdaptParams())
    data.train.texts, data.train.labels, data.val

Rows are validated here; a problem is a `DataError` that names the domain and the fix.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from metaloop.errors import DataError
from metaloop.stage_params import AdaptParams


@dataclass(frozen=True)
class Examples:
    texts: list[str]
    labels: list[str]

    def __post_init__(self):
        if len(self.texts) != len(self.labels):
            raise ValueError("texts and labels differ in length")

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class DomainData:
    domain: str
    labels: list[str]  # sorted; index i is class i
    train: Examples
    val: Examples | None  # held-out slice for early stopping (None: too few rows)
    val_source: str  # "val split", "train holdout" or "none"


def read_table(table: pd.DataFrame | str | Path) -> pd.DataFrame:
    if isinstance(table, (str, Path)):
        path = Path(table)
        if not path.is_file():
            raise DataError(f"{path}: curated dataset not found; run `metaloop curate`")
        table = pd.read_parquet(path)
    missing = {"text", "label", "domain", "split"} - set(table.columns)
    if missing:
        raise DataError(f"curated table lacks columns {sorted(missing)}; re-run `metaloop curate`")
    return table


def domain_data(
    table: pd.DataFrame | str | Path,
    domain: str,
    params: AdaptParams,
    *,
    eval_labels: Sequence[str] | None = None,
    seed: int = 13,
) -> DomainData:
    """The domain's training rows and early-stopping slice; DataError names what is wrong.

    `eval_labels`: the labels of the domain's evaluation set (its fixed evaluation episodes);
    default: the labels of its `test` rows. Training labels and evaluation labels must be the
    same set: a label only one side knows can be neither learned nor scored.
    """
    table = read_table(table)
    rows = table[table["domain"] == domain]
    if rows.empty:
        known = ", ".join(sorted(map(str, table["domain"].unique())))
        raise DataError(f"domain {domain!r}: no rows in the curated dataset (domains present: {known})")
    train = rows[rows["split"] == "train"]
    by_label: dict[str, list[str]] = {}
    for text, label in zip(train["text"], train["label"]):
        by_label.setdefault(str(label), []).append(str(text))
    labels = sorted(by_label)
    if len(labels) < 2:
        raise DataError(
            f"domain {domain!r}: a classifier needs at least 2 labels with train rows, found {labels}; "
            "add examples or drop the domain from domains.target"
        )
    if eval_labels is None:
        eval_labels = sorted(set(map(str, rows.loc[rows["split"] == "test", "label"])))
    if eval_labels:
        unknown_to_eval = sorted(set(labels) - set(eval_labels))
        unknown_to_train = sorted(set(eval_labels) - set(labels))
        if unknown_to_eval or unknown_to_train:
            parts = []
            if unknown_to_eval:
                parts.append(f"labels unknown to its evaluation set: {unknown_to_eval}")
            if unknown_to_train:
                parts.append(f"evaluation labels without train rows: {unknown_to_train}")
            raise DataError(
                f"domain {domain!r}: " + "; ".join(parts)
                + ". Rebuild the evaluation episodes (`metaloop episodes`) from the same curated data, "
                "or give every label train and test rows"
            )
    need = params.shots or 1
    short = {lab: len(texts) for lab, texts in by_label.items() if len(texts) < need}
    if short:
        raise DataError(
            f"domain {domain!r}: adapt.shots={need} but labels {sorted(short)} have only "
            f"{', '.join(f'{lab}={n}' for lab, n in sorted(short.items()))} train rows; "
            "lower adapt.shots or add examples"
        )

    rng = random.Random(f"adapt:{seed}:{domain}")
    val_rows = rows[rows["split"] == "val"]
    val: Examples | None = None
    source = "none"
    pools = {lab: sorted(texts) for lab, texts in by_label.items()}
    for texts in pools.values():
        rng.shuffle(texts)
    if len(val_rows) >= params.early_stopping_min_rows:
        keep = val_rows["label"].astype(str).isin(labels)
        val = Examples(list(map(str, val_rows["text"][keep])), list(map(str, val_rows["label"][keep])))
        source = "val split"
    elif params.holdout_fraction > 0:
        held = {lab: int(len(t) * params.holdout_fraction) for lab, t in pools.items()}
        # holding out must leave each label `need` rows, and the slice must be big enough
        held = {lab: min(n, len(pools[lab]) - need) for lab, n in held.items()}
        if sum(held.values()) >= params.early_stopping_min_rows and all(n > 0 for n in held.values()):
            vt, vl = [], []
            for lab in labels:
                vt += pools[lab][: held[lab]]
                vl += [lab] * held[lab]
                pools[lab] = pools[lab][held[lab] :]
            val = Examples(vt, vl)
            source = "train holdout"
    tt, tl = [], []
    for lab in labels:
        picked = pools[lab][: params.shots] if params.shots else pools[lab]
        tt += picked
        tl += [lab] * len(picked)
    return DomainData(domain, labels, Examples(tt, tl), val, source)


def eval_labels_by_domain(episodes) -> dict[str, list[str]]:
    """{domain: labels} of fixed evaluation episodes (`metaloop.episodes.Episode`s)."""
    out: dict[str, set[str]] = {}
    for ep in episodes:
        out.setdefault(ep.domain, set()).update(ep.labels)
    return {d: sorted(v) for d, v in out.items()}
