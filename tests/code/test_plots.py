"""The PNG plots the flow logs to MLflow are real images in the run's artifacts."""

import json

from tasks.domain import DomainOutcome
from tasks.plots import domain_accuracy, meta_curves
from tasks.tracking import client, experiment_id, start_run


def test_plots_are_logged_as_png(mlflow_sqlite, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "train_loss": 1.2, "train_acc": 0.4}, {"step": 2, "train_loss": 0.9, "train_acc": 0.6,
                                                            "val_loss": 1.0, "val_acc": 0.5}]))
    outcomes = [DomainOutcome("hotel", metrics={"accuracy_before": 60.0, "accuracy_adapted": 85.0, "accuracy": 84.0}),
                DomainOutcome("vet", error="DataError: too few rows")]
    c = client()
    run = start_run(c, experiment_id(c, "plots"), "r")
    c.log_figure(run, meta_curves(metrics), "plots/meta_curves.png")
    c.log_figure(run, domain_accuracy(outcomes), "plots/domain_accuracy.png")
    for name in ("meta_curves.png", "domain_accuracy.png"):
        path = c.download_artifacts(run, f"plots/{name}", str(tmp_path))
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
