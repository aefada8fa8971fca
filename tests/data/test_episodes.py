"""Episodes: composable steps, determinism across runs and processes, fixed eval sets."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pandas as pd
import pytest
import yaml

from support import ROOT
from metaloop.config import parse_params
from metaloop.curate import CURATED, curate
from metaloop.episode_sets import EVAL, META_TRAIN, META_VAL, build_episodes, eval_recipe
from metaloop.episodes import Episode, FromDomains, KShots, NWays, Pool, Recipe, RemapLabels, read_manifest
from metaloop.errors import DataError


def toy_pool(domains=("a", "b"), labels=6, rows=8, test=3) -> Pool:
    data = [
        {"id": f"{d}-{lab}-{i}", "text": f"{d} {lab} {i}", "label": f"l{lab}", "domain": d,
         "split": "test" if i < test else "train"}
        for d in domains for lab in range(labels) for i in range(rows)
    ]
    return Pool(pd.DataFrame(data))


def test_nways_kshots_remap():
    pool = toy_pool()
    ep = Recipe([FromDomains(["a", "b"]), NWays(4), KShots(2, queries=3), RemapLabels()]).sample(pool, 1, 0)
    assert ep.ways == 4 and len(set(ep.labels)) == 4
    assert Counter(ep.support_y) == {y: 2 for y in range(4)} and Counter(ep.query_y) == {y: 3 for y in range(4)}
    assert not set(ep.support_ids) & set(ep.query_ids)
    for ids, ys in ((ep.support_ids, ep.support_y), (ep.query_ids, ep.query_y)):
        for rid, y in zip(ids, ys):
            assert pool.label[rid] == ep.labels[y] and rid.startswith(ep.domain)
            assert rid.split("-")[-1] not in {"0", "1", "2"}  # train split only


def test_ways_range_is_sampled_per_episode():
    recipe = Recipe([FromDomains(["a"]), NWays((2, 5)), KShots(1, queries=1), RemapLabels()])
    ways = {recipe.sample(toy_pool(), 7, i).ways for i in range(60)}
    assert ways == {2, 3, 4, 5}


def test_ways_all_trains_on_every_label_of_the_domain():
    from metaloop.episode_sets import meta_train_recipe

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["episodes"].update(ways="all", shots=1, queries=2)
    raw["domains"].update(meta_train=["a", "b"], meta_val=[], target=["c"])
    params = parse_params(raw)
    assert params.episodes.n_ways is None and params.episodes.min_ways == 2
    pool = toy_pool(domains=("a", "b"), labels=6)
    eps = [meta_train_recipe(params).sample(pool, 3, i) for i in range(6)]
    assert all(e.ways == 6 and sorted(e.labels) == [f"l{i}" for i in range(6)] for e in eps)
    assert len(eps[0].support_ids) == 6 and len(eps[0].query_ids) == 12


def test_meta_train_split_all_draws_every_row_of_the_meta_train_domains():
    from metaloop.episode_sets import meta_train_recipe

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["episodes"].update(ways=3, shots=2, queries=3)  # 5 rows a label: every train row
    raw["domains"].update(meta_train=["a"], meta_val=[], target=["b"])

    def drawn(split: str) -> set[str]:
        raw["episodes"]["meta_train_split"] = split
        recipe = meta_train_recipe(parse_params(raw))
        eps = [recipe.sample(toy_pool(), 5, i) for i in range(40)]
        return {rid for e in eps for rid in (*e.support_ids, *e.query_ids)}

    train_only, every = drawn("train"), drawn("all")
    assert all(int(rid.split("-")[-1]) >= 3 for rid in train_only)  # rows 0-2 are test rows
    assert any(int(rid.split("-")[-1]) < 3 for rid in every)
    assert all(rid.startswith("a-") for rid in every)  # still only the meta-train domain
    assert len(every) > len(train_only)


def test_remap_shuffles_class_order():
    recipe = Recipe([FromDomains(["a"]), NWays(5), KShots(1, queries=1), RemapLabels()])
    orders = {recipe.sample(toy_pool(), 3, i).labels for i in range(30)}
    assert any(list(o) != sorted(o) for o in orders)


def test_too_many_ways_names_the_domain():
    with pytest.raises(DataError, match="domain 'a' has 6 labels.*needs 9"):
        Recipe([FromDomains(["a"]), NWays(9)]).sample(toy_pool(), 0, 0)


def test_same_seed_same_episodes_other_seed_other_episodes():
    recipe = Recipe([FromDomains(["a", "b"]), NWays(3), KShots(2, queries=2), RemapLabels()])
    first = [recipe.sample(toy_pool(), 5, i) for i in range(20)]
    assert first == [recipe.sample(toy_pool(), 5, i) for i in range(20)]
    assert first != [recipe.sample(toy_pool(), 6, i) for i in range(20)]
    assert Episode.from_json(first[3].to_json()) == first[3]


def test_pool_is_independent_of_row_order():
    df = pd.DataFrame([{"id": f"r{i}", "text": str(i), "label": f"l{i % 3}", "domain": "a", "split": "train"} for i in range(30)])
    recipe = Recipe([FromDomains(["a"]), NWays(3), KShots(2, queries=2), RemapLabels()])
    assert recipe.sample(Pool(df), 1, 4) == recipe.sample(Pool(df.sample(frac=1, random_state=0)), 1, 4)


def test_eval_episodes_use_all_labels_train_support_and_every_test_row():
    pool = toy_pool()
    ep = eval_recipe("b", 2).sample(pool, 1, 0)
    assert list(ep.labels) == sorted(ep.labels) and ep.ways == 6
    assert all(pool.label[r] and r.split("-")[-1] not in {"0", "1", "2"} for r in ep.support_ids)
    assert sorted(ep.query_ids) == sorted(r for lab in pool.labels("b", "test") for r in pool.rows("b", "test", lab))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("episodes")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["curation"]["output_dir"] = str(tmp / "curated")
    raw["episodes"].update(output_dir=str(tmp / "episodes"), meta_train_episodes=200, meta_val_episodes=20)
    params = parse_params(raw)
    curate(params)
    return params, build_episodes(params), tmp


def test_stage_outputs_respect_domain_roles(built):
    params, manifest, tmp = built
    table = pd.read_parquet(tmp / "curated" / CURATED).set_index("id")
    train = read_manifest(tmp / "episodes" / META_TRAIN)
    val = read_manifest(tmp / "episodes" / META_VAL)
    evals = read_manifest(tmp / "episodes" / EVAL)
    assert manifest["counts"] == {"meta_train": 200, "meta_val": 20, "eval": len(params.domains.target) * 2 * 5}
    assert {e.domain for e in train} <= set(params.domains.meta_train)
    assert {e.domain for e in val} <= set(params.domains.meta_val)
    assert {e.domain for e in evals} == set(params.domains.target)
    assert set(table.loc[[i for e in val for i in e.query_ids], "split"]) == {"test"}
    target_rows = set(table.index[table["domain"].isin(params.domains.target)])
    assert not target_rows & {i for e in train + val for i in e.support_ids + e.query_ids}


SNIPPET = """
import sys, hashlib
from metaloop.config import load_params
from metaloop.episode_sets import meta_train_recipe
from metaloop.episodes import Pool
params = load_params(sys.argv[1])
pool = Pool.from_parquet(sys.argv[2])
body = "".join(meta_train_recipe(params).sample(pool, params.seed, i).to_json() for i in range(50))
print(hashlib.sha256(body.encode()).hexdigest())
"""


def test_episodes_are_identical_across_processes(built):
    params, manifest, tmp = built
    pfile = tmp / "params.yaml"
    pfile.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    digests = {
        subprocess.run([sys.executable, "-c", SNIPPET, str(pfile), str(tmp / "curated" / CURATED)],
                       capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
        for seed in ("0", "1", "random")
    }
    assert len(digests) == 1


def test_rebuilding_gives_the_same_eval_hash(built):
    params, manifest, tmp = built
    again = build_episodes(params, out_dir=tmp / "again")
    assert again["eval_hash"] == manifest["eval_hash"] and again["files"] == manifest["files"]


def test_rows_hash_and_training_episodes_move_only_with_their_own_domains(built):
    """One domain's changed rows change its rows hash (and eval hash) alone; the meta-train
    and meta-val episode files, which the init's fingerprint reads, do not move."""
    params, manifest, tmp = built
    table = pd.read_parquet(tmp / "curated" / CURATED)
    target = params.domains.target[0]
    row = table[(table["domain"] == target) & (table["split"] == "train")].iloc[0]
    extra = pd.DataFrame([{**row.to_dict(), "id": "extra-row-id", "text": row["text"] + " please"}])
    (tmp / "curated2").mkdir()
    pd.concat([table, extra]).to_parquet(tmp / "curated2" / CURATED)
    again = build_episodes(params, curated_dir=tmp / "curated2", out_dir=tmp / "episodes2")
    changed = {d for d, h in again["rows_hash_by_domain"].items() if manifest["rows_hash_by_domain"][d] != h}
    assert changed == {target}
    assert {d for d, h in again["eval_hash_by_domain"].items() if manifest["eval_hash_by_domain"][d] != h} <= {target}
    assert again["files"][META_TRAIN] == manifest["files"][META_TRAIN]
    assert again["files"][META_VAL] == manifest["files"][META_VAL]
