"""`metaloop` command line: one subcommand per pipeline stage, all reading params.yaml.

    metaloop params              print the resolved configuration (defaults filled in)
    metaloop curate              sources -> data/curated/{curated,quarantine}.parquet + stats.json
    metaloop episodes            curated rows -> data/episodes/*.jsonl manifests
    metaloop corpus              what the packaged corpus holds

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


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # python -m metaloop.cli
    main()
