"""`metaloop` command line: one subcommand per pipeline stage, all reading params.yaml.

    metaloop params              print the resolved configuration (defaults filled in)
    metaloop curate              sources -> data/curated/{curated,quarantine}.parquet + stats.json
    metaloop episodes            curated rows -> data/episodes/*.jsonl manifests
    metaloop corpus              what the packaged corpus holds
    metaloop train [--fresh]     meta-train under torchrun (params.meta: nproc, nnodes, rendezvous)
    metaloop run [--force] [--domain D]   the main job: the retrain flow (Prefect), stale models only
    metaloop serve               serve the retrain flow on params' cron (+ a source watcher)
    metaloop promote [-d D]      challenger -> champion where the promotion policy allows
    metaloop rollback D          champion back to the version it replaced
    metaloop models [--json]     registered domains with champion / challenger versions
    metaloop predict D [FILE|-]  score CSV / JSONL / Parquet / stdin (or --text) with D's champion

The registry commands reach MLflow through `tasks/` (the library itself never imports it);
MLFLOW_TRACKING_URI picks the server (default: sqlite:///mlflow.db).

Errors caused by input (params, data) print one message and exit with status 2.
"""

from __future__ import annotations

import json
import sys
from functools import wraps
from pathlib import Path
from typing import Annotated, Callable

import typer

from metaloop.errors import MetaloopError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Meta-learned few-shot classifiers, kept fresh.")
ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Path to params.yaml.")]


def user_errors(fn: Callable) -> Callable:
    """Turn a MetaloopError into a one-line message and exit status 2 (no traceback)."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MetaloopError as err:
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@user_errors
def params(params: ParamsOpt = Path("params.yaml")) -> None:
    """Print the resolved configuration, with every default filled in."""
    from metaloop.config import dump_params, load_params

    typer.echo(dump_params(load_params(params)), nl=False)


@app.command()
@user_errors
def curate(
    params: ParamsOpt = Path("params.yaml"),
    out: Annotated[Path | None, typer.Option(help="Output folder (default: curation.output_dir).")] = None,
) -> None:
    """Read every source, clean, quarantine bad rows, write Parquet + stats.json."""
    from metaloop.config import load_params
    from metaloop.curate import curate as run

    stats = run(load_params(params), out)
    typer.echo(
        f"curated: {stats['rows_in']} rows in = {stats['rows_kept']} kept + {stats['rows_quarantined']} quarantined"
    )
    for reason, n in stats["by_reason"].items():
        typer.echo(f"  quarantined {n:5d}  {reason}")


@app.command()
@user_errors
def episodes(
    params: ParamsOpt = Path("params.yaml"),
    out: Annotated[Path | None, typer.Option(help="Output folder (default: episodes.output_dir).")] = None,
) -> None:
    """Build meta-train / meta-val / evaluation episode manifests from the curated rows."""
    from metaloop.config import load_params
    from metaloop.episode_sets import build_episodes

    manifest = build_episodes(load_params(params), out_dir=out)
    counts = ", ".join(f"{n} {k}" for k, n in manifest["counts"].items())
    typer.echo(f"episodes: {counts}; eval hash {manifest['eval_hash'][:12]}")


@app.command()
@user_errors
def train(
    params: ParamsOpt = Path("params.yaml"),
    fresh: Annotated[bool, typer.Option("--fresh", help="Discard checkpoints instead of resuming.")] = False,
) -> None:
    """Meta-train under torchrun as params.meta describes; resumes from the last checkpoint."""
    from metaloop.config import load_params
    from metaloop.launch import launch
    from metaloop.train_inputs import preflight

    preflight(load_params(params))
    code = launch(params, *(["--fresh"] if fresh else []))
    if code:
        raise typer.Exit(code)


@app.command()
@user_errors
def corpus(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Summarise the packaged corpus: domains, labels, utterances."""
    from metaloop.config import PackagedSource
    from metaloop.sources import read_source

    rows = read_source(PackagedSource(kind="packaged"), 0)
    summary: dict[str, dict[str, int]] = {}
    for r in rows:
        summary.setdefault(r.domain, {}).setdefault(r.label, 0)
        summary[r.domain][r.label] += 1
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for domain, labels in sorted(summary.items()):
        typer.echo(f"{domain:28s} {len(labels):2d} labels {sum(labels.values()):5d} utterances")
    typer.echo(f"{'total':28s} {sum(map(len, summary.values())):2d} labels {len(rows):5d} utterances")


@app.command("run")
@user_errors
def run_flow(
    params: ParamsOpt = Path("params.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Retrain every model, changed or not.")] = False,
    domain: Annotated[list[str] | None, typer.Option("--domain", "-d", help="Retrain this target domain "
                      "(repeatable) and no other; the init only if it is stale.")] = None,
) -> None:
    """Run the retrain flow (curate -> episodes -> meta-train -> adapt/compress -> promote) for
    the models whose data, params or code changed."""
    import time

    from metaloop.config import load_params
    from tasks.plan import nothing_changed

    start = time.perf_counter()
    resolved = load_params(params)
    # Answer "nothing changed" before starting Prefect's API (most of a no-op run's time);
    # anything else, or anything uncertain, is left to the flow, which checks again.
    plan = None if force or domain else nothing_changed(resolved)
    if plan is not None:
        typer.echo(f"retrain: nothing changed (every model is up to date with its data, params and code; "
                   f"--force retrains) in {time.perf_counter() - start:.1f} s")
        _echo_plan(plan)
        return

    from flows.retrain import run

    summary = run(str(params), force, domain or None)
    typer.echo(f"\nretrain: {summary.status} in {time.perf_counter() - start:.0f} s")
    _echo_summary(summary)
    typer.echo(
        "\nDashboards:\n"
        "  MLflow:  mlflow ui --backend-store-uri sqlite:///mlflow.db   (then http://127.0.0.1:5000)\n"
        "  Prefect: prefect server start                               (then http://127.0.0.1:4200)"
    )
    if summary.status.startswith("failed"):
        raise typer.Exit(1)


def _echo_plan(plan) -> None:
    """The no-op's table: every model, skipped, with the version that keeps serving."""
    typer.echo(f"{'model':24s} {'version':>7s} {'champion':>8s}  action")
    for m in [plan.meta, *plan.domains]:
        typer.echo(f"{m.name:24s} {m.version or '-':>7s} {m.champion or '-':>8s}  "
                   f"{'retrain' if m.retrain else 'skipped'} ({m.why})")
    for d in plan.removed:
        typer.echo(f"{d:24s} {'-':>7s} {'-':>8s}  removed from domains.target: its models stay in the registry")


def _echo_summary(summary) -> None:
    from tasks.publish import decision_text

    meta = summary.meta
    typer.echo(f"{'model':24s} {'version':>7s} {'champion':>8s} {'accuracy':>8s} {'size MB':>8s}  action")
    if meta:
        typer.echo(f"{'meta':24s} {str(meta.get('version') or '-'):>7s} {'':>8s} {'':>8s} {'':>8s}  "
                   f"{meta.get('action', 'retrained')} ({meta.get('why', '')})")
    for d in summary.domains:
        m = d.metrics
        acc = f"{m['accuracy']:8.1f}" if "accuracy" in m else f"{'':>8s}"
        size = f"{m['size_mb']:8.1f}" if "size_mb" in m else f"{'':>8s}"
        typer.echo(f"{d.domain:24s} {d.version or '-':>7s} {d.champion or '-':>8s} {acc} {size}  {decision_text(d)}")
    for d in summary.removed:
        typer.echo(f"{d:24s} {'-':>7s} {'-':>8s} {'':>8s} {'':>8s}  removed from domains.target: "
                   "no longer served by the flow (its models stay in the registry)")


@app.command()
@user_errors
def serve(params: ParamsOpt = Path("params.yaml")) -> None:
    """Serve the retrain flow on params.flow.cron, plus a watcher that retrains when sources change."""
    from flows.schedule import serve as run

    run(str(params))


@app.command()
@user_errors
def promote(
    params: ParamsOpt = Path("params.yaml"),
    domain: Annotated[list[str] | None, typer.Option("--domain", "-d", help="Only these domains.")] = None,
) -> None:
    """Promote each domain's challenger to champion if the policy in params allows it."""
    from metaloop.config import load_params
    from tasks.registry import CHALLENGER, _alias, list_models, model_name
    from tasks.registry import promote as run
    from tasks.tracking import client

    p, c = load_params(params), client()
    domains = domain or [row.domain for row in list_models(c, p.registry.prefix)]
    for d in domains:
        name = model_name(p.registry.prefix, d)
        version = _alias(c, name, CHALLENGER)
        if version is None:
            typer.echo(f"{d}: no challenger")
            continue
        typer.echo(f"{d}: v{version} {run(c, name, version, p.promotion.policy()).summary()}")


@app.command()
@user_errors
def rollback(domain: str, params: ParamsOpt = Path("params.yaml")) -> None:
    """Move a domain's champion back to the champion it replaced (recorded in tags)."""
    from metaloop.config import load_params
    from tasks.registry import model_name
    from tasks.registry import rollback as run
    from tasks.tracking import client

    name = model_name(load_params(params).registry.prefix, domain)
    typer.echo(f"{name}: champion is now v{run(client(), name)}")


@app.command()
@user_errors
def models(params: ParamsOpt = Path("params.yaml"), as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Registered models per domain: champion and challenger versions, key metrics."""
    from metaloop.config import load_params
    from tasks.registry import as_json as to_json
    from tasks.registry import list_models
    from tasks.tracking import client

    rows = list_models(client(), load_params(params).registry.prefix)
    if as_json:
        typer.echo(to_json(rows))
        return
    _echo_models(rows)


@app.command()
@user_errors
def predict(
    domain: Annotated[str, typer.Argument(help="Target domain whose model scores the texts.")],
    source: Annotated[str | None, typer.Argument(help="CSV, JSONL or Parquet file; - for stdin.")] = None,
    text: Annotated[str | None, typer.Option("--text", help="Score this one text instead.")] = None,
    column: Annotated[str, typer.Option(help="The column that holds the texts.")] = "text",
    out: Annotated[str | None, typer.Option("--out", "-o", help="Write here (format from the extension); "
                                            "default: CSV on stdout.")] = None,
    alias: Annotated[str, typer.Option(help="Registry alias to score with.")] = "champion",
    version: Annotated[str | None, typer.Option(help="A version number instead of the alias.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Also list the k best labels.")] = 1,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Score texts with a domain's registered model: its input plus label and score."""
    import tempfile
    import time

    import pandas as pd

    from metaloop.batch import read_inputs, score, write_outputs
    from metaloop.config import load_params
    from metaloop.errors import DataError
    from metaloop.serving import load_classifier
    from tasks.registry import download_classifier, model_name, resolve
    from tasks.tracking import client

    if (text is None) == (source is None):
        raise DataError("metaloop predict: give a FILE (or - for stdin) or --text, not both and not neither")
    prefix = load_params(params).registry.prefix if params.is_file() else "metaloop"
    c = client()
    found = resolve(c, prefix, domain, alias, version)
    table = pd.DataFrame({column: [text]}) if text is not None else read_inputs(source, column)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        clf = load_classifier(download_classifier(c, model_name(prefix, domain), found, Path(tmp)))
        loaded = time.perf_counter() - start
        start = time.perf_counter()
        if len(table) > 2000:
            with typer.progressbar(length=len(table), label=f"scoring {len(table)} rows", file=sys.stderr) as bar:
                scored = score(clf, table, column, top_k, batch_size, bar.update)
        else:
            scored = score(clf, table, column, top_k, batch_size)
        seconds = time.perf_counter() - start
    if text is not None and out is None:
        row = scored.iloc[0]
        typer.echo(f"{row['label']}\t{row['score']:.4f}")
    else:
        printed = write_outputs(scored, out)
        if printed is not None:
            typer.echo(printed, nl=False)
    typer.secho(f"{model_name(prefix, domain)} v{found}: {len(table)} rows in {seconds:.2f} s "
                f"({len(table) / max(seconds, 1e-9):.0f} rows/s; model loaded in {loaded:.2f} s)"
                + (f"; wrote {out}" if out else ""), err=True)


def _echo_models(rows) -> None:
    from tasks.tracking import TAG

    typer.echo(f"{'domain':24s} {'champion':>8s} {'challenger':>10s}  metrics")
    for r in rows:
        metrics = json.loads(r.tags.get(TAG + "metrics", "{}"))
        shown = " ".join(f"{k}={v:.1f}" for k, v in sorted(metrics.items()) if k in ("accuracy", "size_mb", "p50_ms_batch1"))
        typer.echo(f"{r.domain:24s} {r.champion or '-':>8s} {r.challenger or '-':>10s}  {shown}")


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # python -m metaloop.cli
    main()
