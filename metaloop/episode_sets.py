"""The `episodes` stage: meta-train, meta-val and fixed evaluation episode manifests.

    <episodes.output_dir>/meta_train.jsonl   N-way K-shot Q-query, meta-train domains, train rows
    <episodes.output_dir>/meta_val.jsonl     meta-val domains: support from train, queries from test
    <episodes.output_dir>/eval.jsonl         per target domain, per K in eval_shots, eval_draws draws:
                                             all the domain's labels, K support rows each from train,
                                             every test row as a query
    <episodes.output_dir>/manifest.json      counts and content hashes (eval hash and rows hash
                                             per domain: what metaloop.fingerprint reads)

Challenger and champion are only compared when their domain's eval hash is equal.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from metaloop.config import Params
from metaloop.curate import CURATED, write_atomically
from metaloop.episodes import Episode, FromDomains, KShots, NWays, Pool, Recipe, RemapLabels, write_manifest

META_TRAIN, META_VAL, EVAL, MANIFEST = "meta_train.jsonl", "meta_val.jsonl", "eval.jsonl", "manifest.json"


def meta_train_recipe(params: Params) -> Recipe:
    ep = params.episodes
    split = ep.meta_train_split
    return Recipe(
        [FromDomains(params.domains.meta_train), NWays(ep.n_ways, split=split),
         KShots(ep.shots, ep.queries, support_split=split, query_split=split), RemapLabels()],
        name="meta_train",
    )


def meta_val_recipe(params: Params) -> Recipe:
    ep = params.episodes
    return Recipe(
        [FromDomains(params.domains.meta_val), NWays(ep.n_ways),
         KShots(ep.shots, ep.queries, support_split="train", query_split="test"), RemapLabels()],
        name="meta_val",
    )


def eval_recipe(domain: str, shots: int) -> Recipe:
    """All of the domain's labels, in sorted order, every test row as a query."""
    return Recipe(
        [FromDomains([domain]), NWays(None), KShots(shots, None, support_split="train", query_split="test"),
         RemapLabels(shuffle=False)],
        name=f"eval-{domain}-{shots}shot",
    )


def eval_episodes(pool: Pool, params: Params, domain: str) -> list[Episode]:
    ep = params.episodes
    return [eval_recipe(domain, k).sample(pool, params.seed, j) for k in ep.eval_shots for j in range(ep.eval_draws)]


def eval_hash(episodes: list[Episode]) -> str:
    body = "".join(e.to_json() + "\n" for e in episodes)
    return hashlib.sha256(body.encode()).hexdigest()


def rows_hash_by_domain(table: pd.DataFrame) -> dict[str, str]:
    """Per domain, a hash of its rows (content ids) and their splits: equal exactly when the
    domain's curated rows are, whatever happens to other domains' rows."""
    out = {}
    for domain, rows in table.groupby("domain", sort=True):
        body = "\n".join(sorted(f"{i} {s}" for i, s in zip(rows["id"], rows["split"])))
        out[str(domain)] = hashlib.sha256(body.encode()).hexdigest()[:16]
    return out


def build_episodes(params: Params, curated_dir: Path | None = None, out_dir: Path | None = None) -> dict:
    """Write all manifests atomically; return manifest.json's content."""
    table = pd.read_parquet(Path(curated_dir or params.curation.output_dir) / CURATED)
    pool = Pool(table)
    ep = params.episodes
    train = [meta_train_recipe(params).sample(pool, params.seed, i) for i in range(ep.meta_train_episodes)]
    val = (
        [meta_val_recipe(params).sample(pool, params.seed, i) for i in range(ep.meta_val_episodes)]
        if params.domains.meta_val else []
    )
    by_domain = {d: eval_episodes(pool, params, d) for d in sorted(params.domains.target)}
    evals = [e for eps in by_domain.values() for e in eps]
    manifest = {
        "seed": params.seed,
        "counts": {"meta_train": len(train), "meta_val": len(val), "eval": len(evals)},
        "eval_hash": eval_hash(evals),
        "eval_hash_by_domain": {d: eval_hash(eps) for d, eps in by_domain.items()},
        "rows_hash_by_domain": rows_hash_by_domain(table),
    }
    hashes: dict[str, str] = {}

    def manifest_file(name: str, episodes: list[Episode]):
        return lambda p: hashes.__setitem__(name, write_manifest(episodes, p))

    write_atomically(Path(out_dir or ep.output_dir), {
        META_TRAIN: manifest_file(META_TRAIN, train),
        META_VAL: manifest_file(META_VAL, val),
        EVAL: manifest_file(EVAL, evals),
        MANIFEST: lambda p: p.write_text(json.dumps({**manifest, "files": hashes}, indent=2) + "\n"),
    })
    return {**manifest, "files": hashes}
