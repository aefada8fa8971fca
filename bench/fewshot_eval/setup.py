"""The benchmark's data and episodes: `BenchConfig` (domain roles, shots, draws), the params it
runs the library with, the curated CLINC150 pool and the hashed evaluation episodes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

ROOT = Path(__file__).resolve().parents[2]

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .finetune import FinetuneParams
from .pretrain import PretrainParams
from metaloop.config import (
    Backbone,
    Columns,
    Domains,
    Episodes,
    FileSource,
    PackagedSource,
    Meta,
    Params,
    load_params,
)
from metaloop.episode_sets import eval_episodes, eval_hash, meta_train_recipe
from metaloop.sources import packaged_domains
from metaloop.episodes import (
    Episode,
    FromDomains,
    KShots,
    NWays,
    Pool,
    Recipe,
    RemapLabels,
    write_manifest,
)


DEFAULT_DATA = ROOT.parent / "shared" / "data" / "clinc150" / "clinc150.jsonl"
ALGORITHMS = ("protonet", "maml", "fomaml", "reptile", "metasgd", "anil")
BASELINES = ("frozen-centroid", "finetune", "supervised-pretrain")
log = logging.getLogger("bench.fewshot")

# The domain roles were fixed before any measurement by a seeded draw:
# random.Random(13).sample(sorted(CLINC150 domains), 10) -> the first 3 are targets, the next
# one is meta-val, the remaining 6 are meta-train.
TARGETS = ["kitchen_and_dining", "work", "credit_cards"]
META_VAL = ["meta"]
META_TRAIN = ["banking", "small_talk", "utility", "travel", "auto_and_commute", "home"]


class BenchConfig(BaseModel):
    """Everything the benchmark does; every field has a command-line flag."""

    model_config = ConfigDict(extra="forbid")

    data: Path = DEFAULT_DATA
    work_dir: Path = ROOT / "bench" / "results" / "fewshot"
    params: Path | None = Field(ROOT / "params.yaml", description="meta:/episodes:/backbone: defaults.")
    seed: int = 13
    targets: list[str] = Field(default_factory=lambda: list(TARGETS), min_length=1)
    meta_train: list[str] = Field(default_factory=lambda: list(META_TRAIN), min_length=1)
    meta_val: list[str] = Field(default_factory=lambda: list(META_VAL))
    shots: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [1, 5, 10], min_length=1)
    draws: Annotated[int, Field(gt=0)] = 5
    methods: list[str] = Field(default_factory=lambda: [*BASELINES, "protonet"], min_length=1)
    threads: Annotated[int, Field(gt=0)] = 2
    backbone: str | None = Field(None, description="Override backbone.name_or_path.")
    max_length: Annotated[int, Field(gt=0)] | None = None
    centroid_metric: Literal["sqeuclidean", "cosine"] | None = Field(
        None, description="Centroid classifier of the baselines (default: params.yaml meta.metric).")
    label_shots: Annotated[float, Field(ge=0)] | None = Field(
        None, description="Class-name weight in the baselines' centroids (default: meta.label_shots).")
    finetune: FinetuneParams = FinetuneParams()
    ft_impl: Literal["pooled", "adapt-fit"] = "pooled"
    ft_soup: Annotated[int, Field(gt=0)] = Field(
        1, description="--ft-impl adapt-fit: average this many fine-tunings' weights (adapt.soup).")
    pretrain: PretrainParams = PretrainParams()
    meta_steps: Annotated[int, Field(gt=0)] = 100_000
    meta_minutes: Annotated[float, Field(gt=0)] | None = 30.0
    meta_overrides: dict[str, Any] = Field(default_factory=dict, description="meta: keys for every algorithm.")
    meta_overrides_by_algo: dict[str, dict[str, Any]] = Field(default_factory=dict)
    episode_overrides: dict[str, Any] = Field(default_factory=dict, description="episodes: ways/shots/queries/...")
    meta_finetune: bool = False
    packaged_meta_train: bool = Field(
        False, description="Add metaloop's packaged corpus (12 domains x 8 intents) to the meta-train domains.")
    pretrain_centroid_only: bool = Field(False, description="supervised-pretrain: skip the fine-tuning adaptation.")
    head_steps: Annotated[int, Field(ge=0)] = Field(
        0, description="> 0: also score every centroid method as <method>+head (CentroidHeadFit, K >= 2).")
    head_lr: Annotated[float, Field(gt=0)] = 1e-3
    dev: bool = False
    resume: bool = False
    verbose: bool = False

    @model_validator(mode="after")
    def _check(self) -> BenchConfig:
        unknown = [m for m in self.methods if m not in (*BASELINES, *ALGORITHMS)]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; allowed: {', '.join((*BASELINES, *ALGORITHMS))}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("a method is listed twice")
        bad = set(self.meta_overrides_by_algo) - set(ALGORITHMS)
        if bad:
            raise ValueError(f"--meta-set for unknown algorithms {sorted(bad)}")
        if self.ft_soup > 1 and self.ft_impl != "adapt-fit":
            raise ValueError("--ft-soup is adapt.soup: it needs --ft-impl adapt-fit")
        if self.dev and not self.meta_val:
            raise ValueError("--dev scores the meta-val domains: give at least one with --meta-val")
        return self


# ---------------------------------------------------------------- data and episodes


def bench_params(cfg: BenchConfig) -> Params:
    """The library Params the benchmark runs under (base: cfg.params' backbone/meta/episodes)."""
    base = load_params(cfg.params) if cfg.params is not None and Path(cfg.params).is_file() else None
    backbone = base.backbone.model_dump() if base else Backbone().model_dump()
    if cfg.backbone:
        backbone["name_or_path"] = cfg.backbone
    if cfg.max_length:
        backbone["max_length"] = cfg.max_length
    episodes = {**(base.episodes.model_dump() if base else Episodes().model_dump()), **cfg.episode_overrides,
                "eval_shots": sorted(cfg.shots), "eval_draws": cfg.draws,
                "output_dir": cfg.work_dir / "episodes"}
    meta = {**(base.meta.model_dump() if base else Meta().model_dump()), **cfg.meta_overrides,
            "steps": cfg.meta_steps, "threads_per_rank": cfg.threads, "nproc": 1}
    return Params.model_validate({
        "seed": cfg.seed,
        "sources": [FileSource(kind="file", name="clinc150", path=cfg.data, columns=Columns(split="split")),
                    *([PackagedSource(kind="packaged")] if cfg.packaged_meta_train else [])],
        "curation": {"output_dir": cfg.work_dir / "curated"},
        "domains": Domains(meta_train=[*cfg.meta_train, *(packaged_domains() if cfg.packaged_meta_train else [])],
                           meta_val=cfg.meta_val, target=cfg.targets),
        "episodes": episodes, "backbone": backbone, "meta": meta,
    })


def curate_pool(params: Params) -> tuple[Pool, Path]:
    """Curate the data file with the library; (Pool, curated.parquet path)."""
    from metaloop.curate import CURATED, curate

    curate(params, params.curation.output_dir)
    path = Path(params.curation.output_dir) / CURATED
    return Pool.from_parquet(path), path


def meta_val_recipe(params: Params) -> Recipe:
    """Meta-val episodes: support from train, queries from the `val` split (never `test`)."""
    ep = params.episodes
    return Recipe([FromDomains(params.domains.meta_val), NWays(ep.n_ways),
                   KShots(ep.shots, ep.queries, support_split="train", query_split="val"), RemapLabels()],
                  name="meta_val")


def dev_recipe(domain: str, shots: int) -> Recipe:
    """The eval recipe on a meta-val domain with its `val` split as queries (for tuning)."""
    return Recipe([FromDomains([domain]), NWays(None), KShots(shots, None, support_split="train", query_split="val"),
                   RemapLabels(shuffle=False)], name=f"dev-{domain}-{shots}shot")


@dataclass
class EvalSet:
    episodes: list[Episode]
    hash: str
    by_domain: dict[str, str]
    domains: list[str]
    split: str  # "test" (target domains) or "val" (--dev: meta-val domains)


def build_eval_set(pool: Pool, params: Params, dev: bool = False) -> EvalSet:
    """The fixed evaluation episodes every method is scored on."""
    if dev:
        ep = params.episodes
        domains = sorted(params.domains.meta_val)
        by = {d: [dev_recipe(d, k).sample(pool, params.seed, j) for k in ep.eval_shots for j in range(ep.eval_draws)]
              for d in domains}
    else:
        domains = sorted(params.domains.target)
        by = {d: eval_episodes(pool, params, d) for d in domains}
    episodes = [e for d in domains for e in by[d]]
    return EvalSet(episodes, eval_hash(episodes), {d: eval_hash(v) for d, v in by.items()}, domains,
                   "val" if dev else "test")


def write_meta_manifests(pool: Pool, params: Params) -> tuple[Path, Path]:
    out = Path(params.episodes.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ep = params.episodes
    train = [meta_train_recipe(params).sample(pool, params.seed, i) for i in range(ep.meta_train_episodes)]
    val = [meta_val_recipe(params).sample(pool, params.seed, i) for i in range(ep.meta_val_episodes)] \
        if params.domains.meta_val else []
    write_manifest(train, out / "meta_train.jsonl")
    write_manifest(val, out / "meta_val.jsonl")
    return out / "meta_train.jsonl", out / "meta_val.jsonl"
