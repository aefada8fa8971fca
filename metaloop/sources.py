"""Readers for the data sources declared in `params.yaml` (`sources:`).

Every reader returns `RawRow`s: the declared columns mapped onto the curated schema, the
source's name and the row's line number, before any cleaning. A row whose bytes are not
valid UTF-8 keeps them as surrogate escapes so that curation can quarantine it (and count
it) instead of crashing; a file that cannot be read at all raises `DataError` naming the
file, the line where known, and the fix.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from metaloop.config import FileSource, HuggingFaceSource, PackagedSource, S3Source, Source
from metaloop.errors import DataError

_UNDECODABLE = re.compile("[\udc80-\udcff]")


@dataclass(frozen=True)
class RawRow:
    text: Any
    label: Any
    domain: Any
    split: Any
    source: str
    row: int  # 1-based line (CSV/JSONL) or record number, for error reports

    @property
    def undecodable(self) -> bool:
        return any(isinstance(v, str) and _UNDECODABLE.search(v) for v in (self.text, self.label, self.domain, self.split))


def source_name(src: Source, position: int) -> str:
    if src.name:
        return src.name
    match src:
        case PackagedSource():
            return "packaged"
        case FileSource():
            return src.path.name
        case HuggingFaceSource():
            return f"hf:{src.path}"
        case S3Source():
            return src.uri
    return f"source{position}"


def read_source(src: Source, position: int) -> list[RawRow]:
    """Read one declared source; `position` is its index in params.sources (for messages)."""
    name = source_name(src, position)
    where = f"params.yaml sources[{position}]"
    match src:
        case PackagedSource():
            records = _packaged_records(src)
        case FileSource():
            if not src.path.is_file():
                raise DataError(f"{src.path}: file not found ({where}). Fix the path or remove the source.")
            records = parse_bytes(src.path.read_bytes(), src.format or _format_of(str(src.path), where), str(src.path))
        case HuggingFaceSource():
            records = _hf_records(src, where)
        case S3Source():
            records = parse_bytes(_s3_bytes(src, where), src.format or _format_of(src.uri, where), src.uri)
    label = src.path if isinstance(src, FileSource) else getattr(src, "uri", None) or getattr(src, "path", name)
    return list(_map_columns(records, src, name, str(label), where))


# ---------------------------------------------------------------- formats


def _format_of(path: str, where: str) -> str:
    suffix = path.rsplit(".", 1)[-1].lower()
    fmt = {"csv": "csv", "jsonl": "jsonl", "ndjson": "jsonl", "parquet": "parquet", "pq": "parquet"}.get(suffix)
    if fmt is None:
        raise DataError(f"{path}: cannot tell the format from '.{suffix}' ({where}); set `format: csv|jsonl|parquet`")
    return fmt


def _decode(data: bytes, where: str, header: bool) -> str:
    if not data.strip():
        raise DataError(f"{where}: file is empty. Point the source at a file with rows, or remove it.")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data[:4096]:
        raise DataError(f"{where}: not UTF-8 (looks like UTF-16). Re-encode it: iconv -f UTF-16 -t UTF-8 IN > OUT")
    text = data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    lines = [ln for ln in text.splitlines() if ln.strip()][1 if header else 0 :]
    if lines and all(_UNDECODABLE.search(ln) for ln in lines):
        raise DataError(
            f"{where}: not UTF-8 (no row decodes). Re-encode it, e.g. iconv -f LATIN1 -t UTF-8 IN > OUT"
        )
    return text


def parse_bytes(data: bytes, fmt: str, where: str) -> list[tuple[int, dict]]:
    """Parse a whole file into (line number, record) pairs."""
    if fmt == "parquet":
        return _parquet(data, where)
    text = _decode(data, where, header=fmt == "csv")
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames is None or any(_UNDECODABLE.search(f or "") for f in reader.fieldnames):
            raise DataError(f"{where}:1: the CSV header is missing or not UTF-8; the first line must name the columns")
        out = []
        for rec in reader:
            if None in rec:
                raise DataError(
                    f"{where}:{reader.line_num}: more fields than the header has; quote fields that contain commas"
                )
            out.append((reader.line_num, rec))
        if not out:
            raise DataError(f"{where}: has a header but no rows. Add rows or remove the source.")
        return out
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{where}:{n}: malformed JSON line ({err.msg} at column {err.colno}). "
                "Each line must be one JSON object; fix or delete that line."
            ) from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}:{n}: expected a JSON object per line, got {type(rec).__name__}")
        out.append((n, rec))
    return out


def _parquet(data: bytes, where: str) -> list[tuple[int, dict]]:
    import pyarrow.parquet as pq

    if not data:
        raise DataError(f"{where}: file is empty. Point the source at a file with rows, or remove it.")
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{where}: not a readable Parquet file ({err}). Re-export it or fix `format:`") from None
    if table.num_rows == 0:
        raise DataError(f"{where}: has no rows. Add rows or remove the source.")
    return list(enumerate(table.to_pylist(), start=1))


# ---------------------------------------------------------------- origins


def packaged_files() -> list:
    """The packaged corpus: one `<domain>.jsonl` per domain, sorted by name."""
    folder = resources.files("metaloop") / "corpus"
    return sorted((f for f in folder.iterdir() if f.name.endswith(".jsonl")), key=lambda f: f.name)


def packaged_domains() -> list[str]:
    return [f.name.removesuffix(".jsonl") for f in packaged_files()]


def _packaged_records(src: PackagedSource) -> list[tuple[int, dict]]:
    files = packaged_files()
    present = set(packaged_domains())
    wanted = set(src.domains or present)
    if unknown := wanted - present:
        raise DataError(
            f"params.yaml sources: packaged corpus has no domain(s) {sorted(unknown)}; available: {sorted(present)}"
        )
    out, seen = [], {}
    for f in files:
        if f.name.removesuffix(".jsonl") not in wanted:
            continue
        for n, rec in parse_bytes(f.read_bytes(), "jsonl", f"metaloop/corpus/{f.name}"):
            key = (rec.get("domain"), rec.get("label"))
            seen[key] = seen.get(key, 0) + 1
            if src.per_label is None or seen[key] <= src.per_label:
                out.append((n, rec))
    return out


def _hf_records(src: HuggingFaceSource, where: str) -> list[tuple[int, dict]]:
    import datasets

    path = Path(src.path)
    try:
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(src.path)
    except Exception as err:
        raise DataError(
            f"{src.path}: cannot load this Hugging Face dataset ({where}): {err}. "
            "Give a local `save_to_disk` folder, a data folder, or a hub id reachable from here."
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        names = [src.hf_split] if src.hf_split else list(ds)
        if missing := [n for n in names if n not in ds]:
            raise DataError(f"{src.path}: no split {missing} ({where}); available: {list(ds)}")
        parts = [(n, ds[n]) for n in names]
    else:
        parts = [(src.hf_split, ds)]
    out = []
    for split_name, part in parts:
        for i, rec in enumerate(part, start=1):
            # A DatasetDict's split names the split unless a column or constant does.
            if split_name and src.split is None and src.columns.split not in rec:
                rec = {**rec, "__split__": split_name}
            out.append((i, rec))
    if not out:
        raise DataError(f"{src.path}: the dataset has no rows ({where})")
    return out


def _s3_bytes(src: S3Source, where: str) -> bytes:
    import os

    import boto3
    import botocore.exceptions

    bucket, key = src.uri[5:].split("/", 1)
    endpoint = src.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    client = boto3.client("s3", endpoint_url=endpoint)
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        raise DataError(f"{src.uri}: object not found ({where}). Check the bucket and key.") from None
    except botocore.exceptions.BotoCoreError as err:
        raise DataError(
            f"{src.uri}: cannot read ({where}): {err}. Check AWS_ENDPOINT_URL and the AWS_* credentials."
        ) from None
    except botocore.exceptions.ClientError as err:
        raise DataError(f"{src.uri}: cannot read ({where}): {err}") from None


# ---------------------------------------------------------------- mapping


def _map_columns(records: list[tuple[int, dict]], src: Source, name: str, file: str, where: str) -> Iterable[RawRow]:
    cols = src.columns
    needed = {"text": cols.text, "label": cols.label}
    if src.domain is None:
        if cols.domain is None:
            raise DataError(f"{where}: give `domain:` (a constant) or `columns.domain:` (a column)")
        needed["domain"] = cols.domain
    present = set().union(*(rec.keys() for _, rec in records[:1000]))
    # A split column named explicitly must exist; the default name is used only if present.
    if cols.split and ("split" in cols.model_fields_set or cols.split in present):
        needed["split"] = cols.split
    split_col = needed.get("split")
    if missing := {field: col for field, col in needed.items() if col not in present}:
        shown = ", ".join(f"{f} -> '{c}'" for f, c in missing.items())
        raise DataError(
            f"{file}: missing column(s) {shown}; the file has {sorted(present)}. "
            f"Map them in {where}.columns, e.g. columns: {{text: <column>, label: <column>}}"
        )
    for n, rec in records:
        yield RawRow(
            text=rec.get(cols.text),
            label=rec.get(cols.label),
            domain=src.domain if src.domain is not None else rec.get(cols.domain),
            split=src.split if src.split is not None else rec.get(split_col) if split_col else rec.get("__split__"),
            source=name,
            row=n,
        )


def source_fingerprint(sources: list[Source]) -> str:
    """A cheap hash of what the sources currently hold, without parsing them.

    Files and packaged corpus: content digests; S3: the objects' ETags; Hugging Face
    folders: their files' digests (a hub id is fingerprinted by name only). The watch flow
    compares it with the fingerprint curation recorded to decide whether to retrain.
    """
    import hashlib

    h = hashlib.sha256()
    for i, src in enumerate(sources):
        h.update(f"{i}:{src.model_dump_json()}".encode())
        match src:
            case PackagedSource():
                for f in packaged_files():
                    h.update(hashlib.sha256(f.read_bytes()).digest())
            case FileSource():
                h.update(hashlib.sha256(src.path.read_bytes()).digest() if src.path.is_file() else b"missing")
            case HuggingFaceSource():
                folder = Path(src.path)
                for f in sorted(folder.rglob("*")) if folder.is_dir() else []:
                    if f.is_file():
                        h.update(f.relative_to(folder).as_posix().encode() + hashlib.sha256(f.read_bytes()).digest())
            case S3Source():
                import os

                import boto3

                bucket, key = src.uri[5:].split("/", 1)
                client = boto3.client("s3", endpoint_url=src.endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))
                try:
                    h.update(client.head_object(Bucket=bucket, Key=key)["ETag"].encode())
                except Exception:
                    h.update(b"unreadable")
    return h.hexdigest()[:16]
