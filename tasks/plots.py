"""PNG plots logged to MLflow: meta-training curves and per-domain accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on workers
import matplotlib.pyplot as plt  # noqa: E402


def meta_curves(metrics_jsonl: Path):
    """Loss and accuracy by step, train and meta-val, from rank 0's metrics.jsonl."""
    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    fig, (loss, acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, ax in (("loss", loss), ("acc", acc)):
        for split in ("train", "val"):
            points = [(r["step"], r[f"{split}_{key}"]) for r in records if f"{split}_{key}" in r]
            if points:
                ax.plot(*zip(*points), marker="." if split == "val" else None, label=split)
        ax.set_xlabel("step")
        ax.set_title(f"meta-{key}")
        ax.legend()
    fig.tight_layout()
    return fig


def domain_accuracy(outcomes) -> "plt.Figure":
    """Accuracy before adaptation, after adaptation, and of the registered model, per domain
    retrained in this run."""
    done = [o for o in outcomes if not o.error and o.action == "retrained"]
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(done) + 2), 3.5))
    width = 0.27
    for i, (key, label) in enumerate((("accuracy_before", "before adaptation"), ("accuracy_adapted", "adapted"),
                                      ("accuracy", "registered"))):
        ax.bar([j + (i - 1) * width for j in range(len(done))], [o.metrics.get(key, 0.0) for o in done], width,
               label=label)
    ax.set_xticks(range(len(done)), [o.domain for o in done], rotation=15)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
