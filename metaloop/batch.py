"""Batch prediction: read a table of texts, score it with a classifier folder, write it back.

    table = read_inputs("tickets.csv", column="text")     # CSV, JSONL, Parquet, or "-" (stdin)
    scored = score(load_classifier(folder), table, "text", top_k=1, progress=bar)
    write_outputs(scored, "scored.parquet")              # the input's columns + label, score

Input is read by the same parser curation uses (`metaloop.sources.parse_bytes`), so a bad
file gets the same message: the file, the line, the fix. `metaloop predict` is the CLI.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from metaloop.errors import DataError
from metaloop.sources import _format_of, parse_bytes

FORMATS = ("csv", "jsonl", "parquet")


def read_inputs(path: str, column: str = "text", fmt: str | None = None) -> pd.DataFrame:
    """The rows of `path` ("-": standard input: JSONL if it starts with '{', else one text a
    line) as strings, with a `column` of texts."""
    where = "stdin" if path == "-" else path
    if path == "-":
        data = sys.stdin.buffer.read()
        if fmt is None and not data.lstrip().startswith(b"{"):
            lines = [ln for ln in data.decode("utf-8", errors="replace").splitlines() if ln.strip()]
            if not lines:
                raise DataError("stdin: no text to score. Pipe one text a line, JSONL, or pass a file.")
            return pd.DataFrame({column: lines})
        fmt = fmt or "jsonl"
    else:
        if not Path(path).is_file():
            raise DataError(f"{path}: file not found. Pass a CSV, JSONL or Parquet file, or - for stdin.")
        data = Path(path).read_bytes()
        fmt = fmt or _format_of(path, "metaloop predict")
    records = parse_bytes(data, fmt, where)
    table = pd.DataFrame([r for _, r in records])
    if column not in table.columns:
        raise DataError(f"{where}: no column {column!r} (columns: {', '.join(map(str, table.columns))}); "
                        "name the text column with --column")
    lines = [n for n, _ in records]
    missing = [lines[i] for i, t in enumerate(table[column]) if t is None or (isinstance(t, float) and t != t)]
    if missing:
        raise DataError(f"{where}:{missing[0]}: no text in column {column!r} ({len(missing)} row(s) without one); "
                        "fill them in or drop them")
    table[column] = table[column].astype(str)
    return table


def score(classifier, table: pd.DataFrame, column: str, top_k: int = 1, batch_size: int = 64,
          progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """`table` plus `label` and `score` (and `top_labels`, `top_scores` for top_k > 1)."""
    texts = table[column].tolist()
    top: list[list[tuple[str, float]]] = []
    for start in range(0, len(texts), batch_size):
        top += classifier.top_k(texts[start : start + batch_size], top_k)
        if progress:
            progress(min(batch_size, len(texts) - start))
    out = table.copy()
    out["label"] = [t[0][0] for t in top]
    out["score"] = [round(t[0][1], 6) for t in top]
    if top_k > 1:
        out["top_labels"] = [[label for label, _ in t] for t in top]
        out["top_scores"] = [[round(s, 6) for _, s in t] for t in top]
    return out


def write_outputs(table: pd.DataFrame, path: str | None, fmt: str | None = None) -> str | None:
    """Write to `path` (format from its extension), or return CSV text for stdout."""
    if path is None:
        buf = io.StringIO()
        _as_text(table).to_csv(buf, index=False)
        return buf.getvalue()
    fmt = fmt or _format_of(path, "metaloop predict --out")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        table.to_parquet(path, index=False)
    elif fmt == "jsonl":
        table.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        _as_text(table).to_csv(path, index=False)
    return None


def _as_text(table: pd.DataFrame) -> pd.DataFrame:
    out = table.copy()
    for col in ("top_labels", "top_scores"):
        if col in out:
            out[col] = out[col].map(json.dumps)
    return out
