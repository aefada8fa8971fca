"""Curation: every bad-input kind, row conservation, atomic outputs, every source kind."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from support import ROOT, run_cli
from metaloop.config import Domains, parse_params
from metaloop.curate import CURATED, QUARANTINE, STATS, CurationRules, clean, curate
from metaloop.errors import ConfigError, DataError
from metaloop.sources import RawRow

RULES = CurationRules(
    max_chars=40, test_fraction=0.0, val_fraction=0.0,
    domains=Domains(meta_train=["d"], target=["t"]),
    needs={"meta_train": (2, 0), "meta_val": (1, 1), "target": (1, 1)},
)


def raw(text, label="a", domain="d", split=None, source="s", row=1) -> RawRow:
    return RawRow(text=text, label=label, domain=domain, split=split, source=source, row=row)


def reasons(rows: list[RawRow], rules: CurationRules = RULES) -> dict[str, list]:
    kept, quarantined, stats = clean(rows, rules)
    assert stats["rows_in"] == len(rows) == len(kept) + len(quarantined)
    out: dict[str, list] = {}
    for q in quarantined:
        out.setdefault(q["reason"], []).append(q)
    return out


FILLER = [raw("filler one"), raw("filler two")]  # keeps label "a" above the per-label minimum


@pytest.mark.parametrize(
    "row, reason",
    [
        (raw(""), "empty_text"),
        (raw(" \t\n "), "empty_text"),
        (raw(None), "empty_text"),
        (raw("x" * 41), "too_long"),
        (raw("caf\udce9 au lait"), "undecodable"),
        (raw("no label here", label=None), "missing_label"),
        (raw("no label here", label="   "), "missing_label"),
        (raw("no domain here", domain=""), "missing_domain"),
        (raw("odd split", split="holdout"), "unknown_split"),
    ],
)
def test_bad_rows_are_quarantined_with_their_reason(row, reason):
    got = reasons([*FILLER, row])
    assert list(got) == [reason]


def test_conflicting_labels_quarantine_every_copy():
    got = reasons([*FILLER, raw("Reset it", "a"), raw("reset  it", "b"), raw("b1", "b"), raw("b2", "b")])
    assert [q["label"] for q in got["conflicting_labels"]] == ["a", "b"]


def test_duplicates_keep_one_copy():
    kept, quarantined, _ = clean([*FILLER, raw("same text"), raw("Same   text", row=2)], RULES)
    assert [q["reason"] for q in quarantined] == ["duplicate"] and quarantined[0]["row"] == 2
    assert sum(k["text"].casefold() == "same text" for k in kept) == 1


def test_text_in_two_splits_keeps_the_train_copy():
    rows = [*FILLER, raw("leaky", split="test"), raw("leaky", split="train")]
    kept, quarantined, _ = clean(rows, RULES)
    assert [(q["reason"], q["split"]) for q in quarantined] == [("split_leakage", "test")]
    assert [k["split"] for k in kept if k["text"] == "leaky"] == ["train"]


def test_labels_too_small_for_the_episodes_are_quarantined():
    got = reasons([*FILLER, raw("lonely", label="b")])
    assert got["too_few_examples"][0]["label"] == "b"
    assert "meta_train episodes need 2 train" in got["too_few_examples"][0]["detail"]


def test_normalisation_nfc_and_whitespace():
    kept, _, _ = clean([raw("cafe\u0301   con\tleche"), raw("other one")], RULES)
    assert "café con leche" in {k["text"] for k in kept}


def test_ids_are_content_addressed_and_unique():
    rows = [raw(f"text number {i}") for i in range(10)]
    a, _, _ = clean(rows, RULES)
    b, _, _ = clean(list(reversed(rows)), RULES)
    assert [k["id"] for k in a] == [k["id"] for k in b]
    assert len({k["id"] for k in a}) == 10


texts = st.one_of(st.none(), st.sampled_from(["", " ", "hi", "Hi", "hi ", "x" * 50, "bad\udcff", "ok"]), st.text(max_size=12))
rows_strategy = st.lists(
    st.builds(
        RawRow,
        text=texts,
        label=st.sampled_from([None, "", "a", "b", "c"]),
        domain=st.sampled_from([None, "d", "t", "other"]),
        split=st.sampled_from([None, "train", "test", "val", "dev", "weird"]),
        source=st.sampled_from(["s1", "s2"]),
        row=st.integers(1, 1000),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(rows_strategy)
def test_rows_are_conserved(rows):
    kept, quarantined, stats = clean(rows, RULES)
    assert len(kept) + len(quarantined) == len(rows) == stats["rows_in"]
    assert stats["rows_quarantined"] == sum(stats["by_reason"].values()) == len(quarantined)
    for name, s in stats["by_source"].items():
        assert s["rows_in"] == s["rows_kept"] + s["rows_quarantined"] == sum(r.source == name for r in rows)
    keys = [(k["domain"], k["text"].casefold()) for k in kept]
    assert len(keys) == len(set(keys))  # no duplicates, no leakage, no conflicts left
    assert len({k["id"] for k in kept}) == len(kept)


# ---------------------------------------------------------------- files and sources


def params_with(tmp_path: Path, sources: list[dict], **domains) -> "object":
    raw_params = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw_params["sources"] = sources
    raw_params["curation"]["output_dir"] = str(tmp_path / "curated")
    raw_params["domains"] = domains or {"meta_train": ["d"], "target": ["t"]}
    raw_params["episodes"].update(ways=2, shots=1, queries=1, eval_shots=[1])
    return parse_params(raw_params)


def small_rows(n: int = 6) -> list[dict]:
    """Enough rows for 2-way 1-shot episodes in a meta-train domain `d` and a target `t`."""
    return [
        {"utterance": f"{dom} example {lab} number {i}", "intent": lab, "area": dom, "part": "test" if i == 0 else "train"}
        for dom in ("d", "t") for lab in ("x", "y") for i in range(n)
    ]


def write(path: Path, rows: list[dict], fmt: str) -> Path:
    df = pd.DataFrame(rows)
    {"csv": lambda: df.to_csv(path, index=False), "parquet": lambda: df.to_parquet(path),
     "jsonl": lambda: df.to_json(path, orient="records", lines=True)}[fmt]()
    return path


COLUMNS = {"text": "utterance", "label": "intent", "domain": "area", "split": "part"}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_file_sources_with_a_column_mapping(tmp_path, fmt):
    path = write(tmp_path / f"rows.{fmt}", small_rows(), fmt)
    params = params_with(tmp_path, [{"kind": "file", "path": str(path), "columns": COLUMNS}])
    stats = curate(params)
    table = pd.read_parquet(tmp_path / "curated" / CURATED)
    assert stats["rows_kept"] == len(table) == 24
    assert list(table.columns) == ["text", "label", "domain", "split", "id", "source"]
    assert set(table["source"]) == {f"rows.{fmt}"} and set(table["split"]) == {"train", "test"}


def test_huggingface_dataset_from_a_local_folder(tmp_path):
    import datasets

    rows = small_rows()
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([r for r in rows if r["part"] == "train"]),
        "test": datasets.Dataset.from_list([r for r in rows if r["part"] == "test"]),
    })
    dd.save_to_disk(str(tmp_path / "hf"))
    cols = {k: v for k, v in COLUMNS.items() if k != "split"}  # split comes from the DatasetDict
    params = params_with(tmp_path, [{"kind": "huggingface", "path": str(tmp_path / "hf"), "columns": cols}])
    curate(params)
    table = pd.read_parquet(tmp_path / "curated" / CURATED)
    assert len(table) == 24 and table.groupby("split").size().to_dict() == {"test": 4, "train": 20}


def test_s3_source_through_moto_server(tmp_path, s3_bucket, moto_s3):
    client, bucket = s3_bucket
    body = "".join(json.dumps(r) + "\n" for r in small_rows())
    client.put_object(Bucket=bucket, Key="raw/rows.jsonl", Body=body.encode())
    params = params_with(tmp_path, [
        {"kind": "s3", "uri": f"s3://{bucket}/raw/rows.jsonl", "endpoint_url": moto_s3, "columns": COLUMNS},
    ])
    stats = curate(params)
    assert stats["by_source"][f"s3://{bucket}/raw/rows.jsonl"]["rows_kept"] == 24
    missing = params_with(tmp_path, [{"kind": "s3", "uri": f"s3://{bucket}/nope.jsonl", "endpoint_url": moto_s3}])
    with pytest.raises(DataError, match="nope.jsonl: object not found"):
        curate(missing)


def test_mixed_sources_count_rows_per_source(tmp_path):
    path = write(tmp_path / "extra.csv", small_rows() + [{"utterance": " ", "intent": "x", "area": "d", "part": "train"}], "csv")
    params = params_with(
        tmp_path,
        [{"kind": "packaged", "domains": ["hospitality"], "per_label": 10}, {"kind": "file", "path": str(path), "columns": COLUMNS}],
        meta_train=["d"], target=["t", "hospitality"],
    )
    stats = curate(params)
    assert stats["by_source"]["packaged"]["rows_in"] == 80
    assert stats["by_source"]["extra.csv"] == {"rows_in": 25, "rows_kept": 24, "rows_quarantined": 1, "by_reason": {"empty_text": 1}}
    assert json.loads((tmp_path / "curated" / STATS).read_text()) == stats
    q = pd.read_parquet(tmp_path / "curated" / QUARANTINE)
    q = q[q["source"] == "extra.csv"]
    assert q.iloc[0]["row"] == 26 and q.iloc[0]["reason"] == "empty_text"  # CSV line number


BAD_FILES = [
    ("missing.csv", None, "file not found"),
    ("empty.csv", b"", "file is empty"),
    ("utf16.csv", "utterance,intent,area\nhi,x,d\n".encode("utf-16"), "not UTF-8"),
    ("latin1.csv", "utterance,intent,area\n".encode() + "caf\xe9,x,d\n".encode("latin-1") * 3, "not UTF-8"),
    ("columns.csv", b"body,intent,area\nhi,x,d\n", "missing column(s) text -> 'utterance'"),
    ("header_only.csv", b"utterance,intent,area\n", "has a header but no rows"),
    ("broken.jsonl", b'{"utterance": "hi", "intent": "x", "area": "d"}\n{"utterance": "oops"\n', "broken.jsonl:2: malformed JSON"),
    ("list.jsonl", b'["hi", "x"]\n', "list.jsonl:1: expected a JSON object"),
    ("bad.parquet", b"PAR1 this is not parquet", "not a readable Parquet file"),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES)
def test_bad_files_fail_with_the_file_and_the_fix_and_leave_nothing(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    cols = {"text": "utterance", "label": "intent", "domain": "area"}
    params = params_with(tmp_path, [{"kind": "file", "path": str(path), "columns": cols}])
    with pytest.raises(DataError) as err:
        curate(params)
    assert message in str(err.value) and name in str(err.value)
    assert not (tmp_path / "curated").exists()
    assert not list(tmp_path.glob(".*curated*"))  # no temporary leftovers


def test_cli_bad_file_exits_2_and_keeps_previous_output(tmp_path):
    good = write(tmp_path / "good.csv", small_rows(), "csv")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(sources=[{"kind": "file", "path": str(good), "columns": COLUMNS}],
                  domains={"meta_train": ["d"], "target": ["t"]})
    params["curation"]["output_dir"] = str(tmp_path / "curated")
    params["episodes"].update(ways=2, shots=1, queries=1, eval_shots=[1])
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    run_cli("metaloop", "curate", "--params", str(pfile))
    before = (tmp_path / "curated" / CURATED).read_bytes()

    (tmp_path / "good.csv").write_bytes(b"")
    proc = run_cli("metaloop", "curate", "--params", str(pfile), check=False)
    assert proc.returncode == 2 and "good.csv: file is empty" in proc.stderr
    assert (tmp_path / "curated" / CURATED).read_bytes() == before


def test_unknown_role_domain_is_a_config_error(tmp_path):
    path = write(tmp_path / "rows.csv", small_rows(), "csv")
    params = params_with(tmp_path, [{"kind": "file", "path": str(path), "columns": COLUMNS}], meta_train=["d"], target=["nowhere"])
    with pytest.raises(ConfigError, match=r"domains.target: domain 'nowhere' has no usable rows"):
        curate(params)


def test_one_undecodable_row_in_a_file_is_quarantined_not_fatal(tmp_path):
    good = pd.DataFrame(small_rows()).to_csv(index=False).encode()
    path = tmp_path / "mixed.csv"
    path.write_bytes(good + "caf\xe9 order,x,d,train\n".encode("latin-1"))
    curate(params_with(tmp_path, [{"kind": "file", "path": str(path), "columns": COLUMNS}]))
    q = pd.read_parquet(tmp_path / "curated" / QUARANTINE)
    assert q[["reason", "text", "row"]].values.tolist() == [["undecodable", "caf\\xe9 order", 26]]


def test_a_split_column_is_used_by_default_and_an_explicit_one_must_exist(tmp_path):
    rows = [{"text": r["utterance"], "label": r["intent"], "domain": r["area"], "split": r["part"]} for r in small_rows()]
    path = write(tmp_path / "plain.jsonl", rows, "jsonl")
    curate(params_with(tmp_path, [{"kind": "file", "path": str(path)}]))
    table = pd.read_parquet(tmp_path / "curated" / CURATED)
    assert (table["split"] == "test").sum() == 4  # the file's own splits, not hashed ones
    with pytest.raises(DataError, match="split -> 'fold'"):
        curate(params_with(tmp_path, [{"kind": "file", "path": str(path), "columns": {"split": "fold"}}]))


# ---------------------------------------------------------------- splits, rule order, failures (issue 27)

HASHED = CurationRules(  # a domain with no role: no per-label minimum, only the split rules
    max_chars=100, test_fraction=0.3, val_fraction=0.2, domains=Domains(meta_train=["d"], target=["t"]),
    needs={"meta_train": (2, 0), "meta_val": (1, 1), "target": (1, 1)},
)


def _splits(rows: list[RawRow]) -> dict[str, str]:
    kept, quarantined, _ = clean(rows, HASHED)
    assert not quarantined
    return {k["text"]: k["split"] for k in kept}


def test_hashed_splits_keep_every_row_in_its_split_when_rows_are_added():
    old = [raw(f"request number {i}", label="ab"[i % 2], domain="free", row=i + 1) for i in range(300)]
    before = _splits(old)
    counts = {s: sum(v == s for v in before.values()) for s in ("train", "val", "test")}
    # every split gets its share (0.5 / 0.2 / 0.3 of 300, within hashing noise)
    assert 120 <= counts["train"] <= 180 and 35 <= counts["val"] <= 85 and 65 <= counts["test"] <= 115, counts
    # New rows arrive first (so every old row's line number moves) and from another source too.
    new = [raw(f"another request {i}", label="ab"[i % 2], domain="free", source="s2", row=i + 1) for i in range(200)]
    shifted = [RawRow(r.text, r.label, r.domain, r.split, r.source, r.row + 200) for r in old]
    after = _splits([*new, *shifted])
    assert {t: after[t] for t in before} == before
    assert {after[t] for t in after if t.startswith("another")} == {"train", "val", "test"}
    # the split is a function of (domain, text) alone: case and spacing do not move it
    assert _splits([raw("  REQUEST   number 7 ", domain="free")]) == {"REQUEST number 7": before["request number 7"]}


@pytest.mark.parametrize("alias, split", [
    ("train", "train"), ("training", "train"), ("Training", "train"),
    ("val", "val"), ("valid", "val"), ("validation", "val"), ("dev", "val"), (" DEV ", "val"),
    ("test", "test"), ("testing", "test"), ("Test", "test"),
])
def test_split_aliases_map_to_train_val_test(alias, split):
    kept, quarantined, _ = clean([*FILLER, raw("the aliased row", split=alias)], RULES)
    assert not quarantined
    assert [k["split"] for k in kept if k["text"] == "the aliased row"] == [split]


def _reason_by_row(rows: list[RawRow]) -> dict[int, str | None]:
    kept, quarantined, stats = clean(rows, RULES)
    assert stats["rows_in"] == len(rows) == len(kept) + len(quarantined)
    got: dict[int, str | None] = {r.row: None for r in rows}
    for q in quarantined:
        got[q["row"]] = q["reason"]
    return got


def test_a_text_in_val_and_test_keeps_the_val_copy_and_train_beats_both():
    got = _reason_by_row([*FILLER, raw("val or test", split="test", row=10), raw("val or test", split="val", row=11)])
    assert (got[10], got[11]) == ("split_leakage", None)
    kept, quarantined, _ = clean([*FILLER, raw("val or test", split="test", row=10),
                                  raw("val or test", split="val", row=11)], RULES)
    assert quarantined[0]["detail"] == "also in split 'val', which keeps it"
    got = _reason_by_row([*FILLER, raw("everywhere", split="test", row=10), raw("everywhere", split="val", row=11),
                          raw("everywhere", split="train", row=12)])
    assert (got[10], got[11], got[12]) == ("split_leakage", "split_leakage", None)


@pytest.mark.parametrize("rows, expected", [
    # first-pass rules, in the documented order: each row gets the first reason that applies
    ([raw("caf\udce9" + "x" * 50, label=None, row=10)], {10: "undecodable"}),
    ([raw("   ", label=None, domain="", row=10)], {10: "empty_text"}),
    ([raw("x" * 41, label=None, split="holdout", row=10)], {10: "too_long"}),
    ([raw("no label, no domain", label=None, domain="", row=10)], {10: "missing_label"}),
    ([raw("no domain, odd split", domain="", split="holdout", row=10)], {10: "missing_domain"}),
    # an unknown split takes the row out before the group rules see it
    ([raw("twice", row=10), raw("twice", split="holdout", row=11)], {10: None, 11: "unknown_split"}),
    # conflicting labels before leakage: every copy goes, not just the other split's
    ([raw("shared", "a", split="train", row=10), raw("shared", "b", split="test", row=11)],
     {10: "conflicting_labels", 11: "conflicting_labels"}),
    # leakage before duplicate: the test copy leaks, the second train copy is a duplicate
    ([raw("thrice", split="test", row=10), raw("thrice", split="train", row=11), raw("thrice", split="train", row=12)],
     {10: "split_leakage", 11: None, 12: "duplicate"}),
    # too few examples last, counted after duplicates are gone: label b keeps one train row of two
    ([raw("b only", "b", row=10), raw("B  only", "b", row=11)], {10: "too_few_examples", 11: "duplicate"}),
])
def test_rules_apply_in_their_documented_order(rows, expected):
    got = _reason_by_row([*FILLER, *rows])
    assert {r: got[r] for r in expected} == expected
    assert got[1] is None  # the filler stays


def test_a_domain_left_with_too_few_labels_names_domain_role_and_fix(tmp_path):
    rows = small_rows()
    # domain d's label y keeps a single train row: too few for 1-shot + 1-query episodes
    rows = [r for r in rows if not (r["area"] == "d" and r["intent"] == "y")]
    rows.append({"utterance": "d lonely y", "intent": "y", "area": "d", "part": "train"})
    path = write(tmp_path / "rows.csv", rows, "csv")
    with pytest.raises(DataError) as err:
        curate(params_with(tmp_path, [{"kind": "file", "path": str(path), "columns": COLUMNS}]))
    assert str(err.value) == ("domain 'd' (meta_train) keeps 1 label(s) after curation; its episodes need at "
                              "least 2. Add examples or lower episodes.ways.")
    assert not (tmp_path / "curated").exists() and not list(tmp_path.glob(".*curated*"))

    rows = [r for r in small_rows() if not (r["area"] == "t" and r["intent"] == "y")]
    path = write(tmp_path / "rows2.csv", rows, "csv")
    with pytest.raises(DataError, match=r"domain 't' \(target\) keeps 1 label\(s\) after curation; its episodes "
                                        r"need at least 2\. Add examples of another label or remove 't' from "
                                        r"domains\.target\."):
        curate(params_with(tmp_path, [{"kind": "file", "path": str(path), "columns": COLUMNS}]))


def test_a_failed_write_leaves_the_previous_output_whole_and_no_partial_files(tmp_path):
    """A real write failure, as root too: the file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored)
    lets the small curated.parquet through and fails quarantine.parquet with EFBIG."""
    import random
    import resource
    import signal

    good = write(tmp_path / "good.csv", small_rows(), "csv")
    curate(params_with(tmp_path, [{"kind": "file", "path": str(good), "columns": COLUMNS}]))
    out = tmp_path / "curated"
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    rng = random.Random(0)
    noise = [{"utterance": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(60)), "intent": "",
              "area": "d", "part": "train"} for _ in range(1500)]  # all quarantined (missing_label)
    changed = write(tmp_path / "changed.csv", [r | {"utterance": r["utterance"] + " v2"} for r in small_rows()] + noise,
                    "csv")
    params = params_with(tmp_path, [{"kind": "file", "path": str(changed), "columns": COLUMNS}])
    limit = 32 * 1024  # curated.parquet (24 rows) is a few kB; quarantine.parquet (1500 random texts) is ~100 kB
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(OSError) as err:
            curate(params)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert "too large" in str(err.value).lower() or getattr(err.value, "errno", None) == 27, err.value

    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched, all three files
    stats = json.loads((out / STATS).read_text())
    kept, quarantined = pd.read_parquet(out / CURATED), pd.read_parquet(out / QUARANTINE)
    assert stats["rows_in"] == stats["rows_kept"] + stats["rows_quarantined"] == len(kept) + len(quarantined) == 24
    assert not any("v2" in t for t in kept["text"])
    assert sorted(p.name for p in tmp_path.iterdir() if "curated" in p.name) == ["curated"]  # no .tmp-/.stale-
