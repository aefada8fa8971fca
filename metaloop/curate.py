"""Curation: raw rows from every source -> one clean table, a quarantine, and stats.

`clean()` is the pure core (rows in = rows kept + rows quarantined, always); `curate()`
reads the sources declared in params, cleans, and writes the outputs atomically:

    <curation.output_dir>/curated.parquet     text, label, domain, split, id, source
    <curation.output_dir>/quarantine.parquet  + reason, detail, row (line in its source)
    <curation.output_dir>/stats.json          counts per source and per reason

Rules, in order (each row gets the first reason that applies):
  undecodable         bytes that are not UTF-8
  empty_text          empty or whitespace-only after normalisation (NFC, folded spaces)
  too_long            more than curation.max_chars characters
  missing_label / missing_domain
  unknown_split       a split other than train / val / test (and their usual aliases)
  conflicting_labels  one normalised text (per domain, case-insensitive) with several labels: all copies
  split_leakage       one text in several splits: the copy in the earliest of train, val, test is kept
  duplicate           the same text and label again: the first copy is kept
  too_few_examples    a label with fewer rows than its domain's episodes need (see `label_needs`)

Rows without a split are hashed into one from (domain, text), so a row never changes
split when other rows are added; that keeps yesterday's test rows out of today's training.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from metaloop.atomic import commit_dir, fresh_tmp
from metaloop.config import Domains, Params
from metaloop.errors import ConfigError, DataError
from metaloop.names import domain_problem, is_empty_text, label_problem, strip_controls
from metaloop.sources import RawRow, read_source, source_fingerprint

CURATED, QUARANTINE, STATS = "curated.parquet", "quarantine.parquet", "stats.json"
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}
SPLIT_PRIORITY = ("train", "val", "test")


@dataclass(frozen=True)
class CurationRules:
    """What `clean()` needs from params, so it can be tested without a params file."""

    max_chars: int
    test_fraction: float
    val_fraction: float
    domains: Domains
    needs: dict[str, tuple[int, int]]  # role -> (min train rows, min test rows) per label

    @classmethod
    def from_params(cls, params: Params) -> "CurationRules":
        return cls(
            max_chars=params.curation.max_chars,
            test_fraction=params.curation.test_fraction,
            val_fraction=params.curation.val_fraction,
            domains=params.domains,
            needs=label_needs(params),
        )


def label_needs(params: Params) -> dict[str, tuple[int, int]]:
    """Rows per label each role's episodes need: (train rows, test rows).

    meta-train episodes draw support and query from train; meta-val and evaluation
    episodes draw support from train and queries from test (val rows are left to
    adaptation, e.g. for early stopping).
    """
    ep = params.episodes
    return {
        "meta_train": (ep.shots + ep.queries, 0),
        "meta_val": (ep.shots, 1),
        "target": (max(ep.eval_shots), 1),
    }


def normalise(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return " ".join(unicodedata.normalize("NFC", str(value)).split())


def _fraction(*parts: str) -> float:
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def row_id(domain: str, label: str, text: str) -> str:
    """Content-addressed: the same example gets the same id in every curation run."""
    return hashlib.sha256(f"{domain}\x1f{label}\x1f{text.casefold()}".encode()).hexdigest()[:16]


def _printable(value: object) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class _Row:
    raw: RawRow
    text: str = ""
    label: str = ""
    domain: str = ""
    split: str = ""
    reason: str | None = None
    detail: str = ""
    controls: int = 0  # control characters removed from the text


def _first_pass(raw: RawRow, rules: CurationRules) -> _Row:
    row = _Row(raw)
    if raw.undecodable:
        row.reason, row.detail = "undecodable", "bytes that are not UTF-8"
        return row
    text, row.controls = strip_controls("" if raw.text is None or (isinstance(raw.text, float) and
                                                                    math.isnan(raw.text)) else str(raw.text))
    row.text, row.label, row.domain = normalise(text), normalise(raw.label), normalise(raw.domain)
    if is_empty_text(row.text):
        row.reason = "empty_text"
    elif len(row.text) > rules.max_chars:
        row.reason, row.detail = "too_long", f"{len(row.text)} chars > curation.max_chars={rules.max_chars}"
    elif not row.label:
        row.reason = "missing_label"
    elif not row.domain:
        row.reason = "missing_domain"
    elif domain_problem(row.domain):
        row.reason, row.detail = "bad_domain_name", domain_problem(row.domain)
    elif label_problem(row.label):
        row.reason, row.detail = "bad_label_name", label_problem(row.label)
    else:
        split = normalise(raw.split).lower()
        if not split:
            f = _fraction(row.domain, row.text.casefold())
            split = "test" if f < rules.test_fraction else "val" if f < rules.test_fraction + rules.val_fraction else "train"
        if split not in SPLIT_ALIASES:
            row.reason, row.detail = "unknown_split", f"split {split!r}; allowed: {sorted(SPLIT_ALIASES)}"
        else:
            row.split = SPLIT_ALIASES[split]
    return row


def _resolve_groups(rows: list[_Row]) -> None:
    groups: dict[tuple[str, str], list[_Row]] = defaultdict(list)
    for row in rows:
        if row.reason is None:
            groups[(row.domain, row.text.casefold())].append(row)
    for copies in groups.values():
        labels = sorted({r.label for r in copies})
        if len(labels) > 1:
            for r in copies:
                r.reason, r.detail = "conflicting_labels", f"same text labelled {labels}"
            continue
        keep_split = min((r.split for r in copies), key=SPLIT_PRIORITY.index)
        kept = False
        for r in copies:
            if r.split != keep_split:
                r.reason, r.detail = "split_leakage", f"also in split {keep_split!r}, which keeps it"
            elif kept:
                r.reason, r.detail = "duplicate", "an earlier copy is kept"
            else:
                kept = True


def _check_label_counts(rows: list[_Row], rules: CurationRules) -> None:
    counts: Counter[tuple[str, str, str]] = Counter()
    for r in rows:
        if r.reason is None:
            counts[(r.domain, r.label, r.split)] += 1
    short: dict[tuple[str, str], str] = {}
    for domain, label in {(d, lab) for d, lab, _ in counts}:
        role = rules.domains.role_of(domain)
        if role is None:
            continue
        need_train, need_held = rules.needs[role]
        have_train, have_held = counts[(domain, label, "train")], counts[(domain, label, "test")]
        if have_train < need_train or have_held < need_held:
            short[(domain, label)] = (
                f"{have_train} train / {have_held} test rows; {role} episodes need "
                f"{need_train} train / {need_held} test"
            )
    for r in rows:
        if r.reason is None and (r.domain, r.label) in short:
            r.reason, r.detail = "too_few_examples", short[(r.domain, r.label)]


def clean(raw_rows: Iterable[RawRow], rules: CurationRules) -> tuple[list[dict], list[dict], dict]:
    """Split raw rows into kept and quarantined rows; return (kept, quarantined, stats)."""
    rows = [_first_pass(r, rules) for r in raw_rows]
    _resolve_groups(rows)
    _check_label_counts(rows, rules)

    kept = sorted(
        (
            {"text": r.text, "label": r.label, "domain": r.domain, "split": r.split,
             "id": row_id(r.domain, r.label, r.text), "source": r.raw.source}
            for r in rows if r.reason is None
        ),
        key=lambda k: (k["domain"], k["label"], k["id"]),
    )
    quarantined = [
        {"text": _printable(r.raw.text), "label": _printable(r.raw.label), "domain": _printable(r.raw.domain),
         "split": _printable(r.raw.split), "source": r.raw.source, "row": r.raw.row,
         "reason": r.reason, "detail": r.detail}
        for r in rows if r.reason is not None
    ]
    return kept, quarantined, _stats(rows, kept, rules)


def _stats(rows: list[_Row], kept: list[dict], rules: CurationRules) -> dict:
    by_source: dict[str, dict] = defaultdict(lambda: {"rows_in": 0, "rows_kept": 0, "rows_quarantined": 0, "by_reason": Counter()})
    for r in rows:
        s = by_source[r.raw.source]
        s["rows_in"] += 1
        if r.reason is None:
            s["rows_kept"] += 1
        else:
            s["rows_quarantined"] += 1
            s["by_reason"][r.reason] += 1
    domains: dict[str, dict] = defaultdict(lambda: {"labels": set(), "train": 0, "val": 0, "test": 0})
    for k in kept:
        d = domains[k["domain"]]
        d["labels"].add(k["label"])
        d[k["split"]] += 1
    reasons = Counter(r.reason for r in rows if r.reason is not None)
    cleaned = [r for r in rows if r.reason is None and r.controls]
    return {
        # kept rows whose text lost control characters (tabs and newlines became spaces instead)
        "control_chars_removed": {"rows": len(cleaned), "chars": sum(r.controls for r in cleaned)},
        "rows_in": len(rows),
        "rows_kept": len(kept),
        "rows_quarantined": sum(reasons.values()),
        "by_reason": dict(sorted(reasons.items())),
        "by_source": {n: {**s, "by_reason": dict(sorted(s["by_reason"].items()))} for n, s in sorted(by_source.items())},
        "domains": {
            n: {"role": rules.domains.role_of(n), "labels": len(d["labels"]), "train": d["train"], "val": d["val"], "test": d["test"]}
            for n, d in sorted(domains.items())
        },
    }


def check_roles(stats: dict, params: Params) -> None:
    """Every domain given a role must survive curation with enough labels for its episodes."""
    present = stats["domains"]
    for role in ("meta_train", "meta_val", "target"):
        for name in getattr(params.domains, role):
            if name not in present:
                raise ConfigError(
                    f"params.yaml domains.{role}: domain {name!r} has no usable rows after curation "
                    f"(domains present: {sorted(present)}). Fix the name, or see quarantine.parquet for why its rows were dropped."
                )
            need = params.episodes.min_ways if role != "target" else 2
            if present[name]["labels"] < need:
                # a target's 2 labels are a classifier's minimum, which no setting lowers
                fix = ("Add examples or lower episodes.ways." if role != "target" else
                       f"Add examples of another label or remove {name!r} from domains.target.")
                raise DataError(
                    f"domain {name!r} ({role}) keeps {present[name]['labels']} label(s) after curation; "
                    f"its episodes need at least {need}. {fix}"
                )


_CURATED_SCHEMA = pa.schema([(c, pa.string()) for c in ("text", "label", "domain", "split", "id", "source")])
_QUARANTINE_SCHEMA = pa.schema(
    [(c, pa.string()) for c in ("text", "label", "domain", "split", "source")]
    + [("row", pa.int64()), ("reason", pa.string()), ("detail", pa.string())]
)


def write_atomically(out_dir: Path, files: dict[str, callable]) -> None:
    """Write every file into a temporary sibling folder, then swap it in: all or nothing."""
    tmp = fresh_tmp(out_dir)
    try:
        for name, write in files.items():
            write(tmp / name)
        commit_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def curate(params: Params, out_dir: Path | None = None) -> dict:
    """Read every source, clean, check domain roles, write outputs; return the stats."""
    raw: list[RawRow] = []
    for i, src in enumerate(params.sources):
        raw.extend(read_source(src, i))
    kept, quarantined, stats = clean(raw, CurationRules.from_params(params))
    check_roles(stats, params)
    stats["source_fingerprint"] = source_fingerprint(params.sources)
    out_dir = Path(out_dir or params.curation.output_dir)
    write_atomically(out_dir, {
        CURATED: lambda p: pq.write_table(pa.Table.from_pylist(kept, _CURATED_SCHEMA), p),
        QUARANTINE: lambda p: pq.write_table(pa.Table.from_pylist(quarantined, _QUARANTINE_SCHEMA), p),
        STATS: lambda p: p.write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8"),
    })
    return stats
