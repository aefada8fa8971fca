"""Benchmark: few-shot accuracy on CLINC150 -- does the meta-learned initialisation win?

    python bench/fewshot.py                                   # the full benchmark (see docs/fewshot.md)
    python bench/fewshot.py --methods frozen-centroid,finetune,protonet --targets kitchen_and_dining \
        --shots 1,5 --draws 2 --meta-steps 4 --threads 1 --json out.json --plot out.png     # a smoke run
    python bench/fewshot.py --dev ...                         # score on the meta-val domains' val split
                                                              # (for tuning; never tune on the targets)

Data: `../shared/data/clinc150/clinc150.jsonl` (10 domains x 15 intents; 100 train, 20 val,
30 test rows per intent), read at run time and curated by the library (`metaloop.curate`, a
`file` source with its `split` column) into `<work-dir>/curated/`; nothing of it is copied
into the repository. Domain roles (`BenchConfig`): 3 held-out target domains; 7 source
domains, of which `meta_val` ones are kept out of meta-training and supervised pretraining
and serve as the validation set (their `val` split gives the meta-val queries); the rest
are meta-train domains.

Evaluation episodes: `metaloop.episode_sets.eval_episodes` per target domain (the library's
eval recipe): all 15 intents, K train rows each, every test row of the domain as a query,
for K in --shots and --draws support draws; hashed, and every method is checked to score
exactly those episodes (`eval_hash`).

Methods (--methods, in this order):
  frozen-centroid      the pretrained encoder, frozen; nearest class mean of the support
                       embeddings (squared Euclidean, mean pooling). No training.
  finetune             standard fine-tuning on the K shots from the pretrained checkpoint: the
                       encoder + a linear head initialised from the support prototypes, AdamW,
                       a fixed number of epochs (`metaloop.fewshot.Finetune`). --ft-impl adapt-fit
                       uses the production adaptation `metaloop.adapt.fit` instead.
  supervised-pretrain  the encoder + one linear head over every meta-train intent, trained
                       non-episodically (cross-entropy, mini-batches), best step by the centroid
                       accuracy on the meta-val episodes; then the same adaptation as finetune.
  protonet, maml, fomaml, reptile, metasgd, anil
                       meta-training with `metaloop.train.run` on the meta-train episodes
                       (meta-val episodes for early stopping), within --meta-steps and
                       --meta-minutes; then the algorithm's own adaptation (`learner.evaluate`).
                       --meta-finetune also scores `<algorithm>+finetune` (the finetune
                       adaptation from the meta-learned encoder).

Meta-training knobs come from params.yaml's `meta:` and `episodes:` sections (ways, shots,
queries), so the tuned defaults live in one place; flags override them (--meta-set
[ALGO.]KEY=VALUE for any `meta:` key, e.g. --meta-set reptile.outer_lr=1e-3).

Output: a table on stdout (mean and 95% CI over episodes, per method and K; wall times),
--json PATH ({"target_domains", "eval_hash", "results": [{"method", "shots", "accuracy",
"ci95", "seconds"}], plus provenance: config, train_seconds, per-domain and per-episode
accuracies}); `seconds` in a result row is the adaptation + scoring time of that K's
episodes; one-off training time is `train_seconds[method]`. --plot PATH: accuracy
against shots, one line per method, 95% CI bars.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
from metaloop.memory import keep_freed_memory
from metaloop.episodes import (
    Episode,
    FromDomains,
    KShots,
    NWays,
    Pool,
    Recipe,
    RemapLabels,
    read_manifest,
    write_manifest,
)
from metaloop.errors import MetaloopError
from metaloop.fewshot import (
    CentroidHeadFit,
    EmbeddingCache,
    EpisodeScore,
    Finetune,
    FinetuneParams,
    FrozenCentroid,
    MetaLearnerMethod,
    PretrainParams,
    Summary,
    score_episodes,
    summarise,
    supervised_pretrain,
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


# ---------------------------------------------------------------- running methods


@dataclass
class MethodRun:
    name: str
    scores: list[EpisodeScore]
    eval_hash: str  # hash of the episodes this method was scored on
    train_seconds: float
    info: dict = field(default_factory=dict)

    def summary(self) -> dict[int, Summary]:
        return summarise(self.scores)

    def eval_seconds(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for s in self.scores:
            out[s.shots] = out.get(s.shots, 0.0) + s.seconds
        return out


@dataclass
class Report:
    evalset: EvalSet
    runs: list[MethodRun]
    config: dict
    machine: dict


def _say(msg: str) -> None:
    print(f"[fewshot {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def score(name: str, method, evalset: EvalSet, pool: Pool, train_seconds: float, verbose: bool = False,
          info: dict | None = None) -> MethodRun:
    """Score `method` on the evaluation episodes; the episodes are re-hashed and checked."""
    episodes = list(evalset.episodes)
    seen = eval_hash(episodes)
    if seen != evalset.hash:
        raise AssertionError(f"{name}: evaluation episodes changed (hash {seen[:12]} != {evalset.hash[:12]})")
    cb = (lambda s: _say(f"  {name} {s.episode}: {s.accuracy:.2f}% ({s.seconds:.1f}s)")) if verbose else None
    scores = score_episodes(name, method, episodes, pool.texts, on_episode=cb)
    assert [s.episode for s in scores] == [e.id for e in episodes]
    run = MethodRun(name, scores, seen, train_seconds, info or {})
    summ = " ".join(f"{k}-shot {v.mean:.2f}±{v.ci95:.2f}" for k, v in run.summary().items())
    _say(f"{name}: {summ} (train {train_seconds:.0f}s, eval {sum(run.eval_seconds().values()):.0f}s)")
    return run


def _backbone(params: Params):
    from metaloop.backbone import load_backbone

    model, tok = load_backbone(params.backbone)
    model.eval()
    return model, tok


def _finetune_method(cfg: BenchConfig, params: Params, model, tok, init_folder: str | Path | None):
    if cfg.ft_impl == "adapt-fit":
        from metaloop.adapt import AdaptParams
        from metaloop.fewshot import AdaptFitMethod

        if init_folder is None:
            raise ValueError("--ft-impl adapt-fit needs a model folder")
        ft = cfg.finetune
        if ft.classifier == "episodic":
            raise ValueError("--ft-impl adapt-fit trains a linear or centroids classifier, not episodic")
        ap = AdaptParams(strategy="full" if ft.scope == "all" else ft.scope, top_k=ft.top_k, epochs=ft.epochs,
                         batch_size=ft.batch_size, lr=ft.lr, head_lr=ft.head_lr, weight_decay=ft.weight_decay,
                         warmup=ft.warmup, prototype_head=ft.prototype_head, holdout_fraction=0.0,
                         threads=cfg.threads, classifier=ft.classifier, soup=cfg.ft_soup)
        return AdaptFitMethod(init_folder, ap, max_length=params.backbone.max_length, seed=params.seed,
                              centroids=baseline_centroids(cfg, params), pooling=params.backbone.pooling)
    return Finetune(model, tok, cfg.finetune, pooling=params.backbone.pooling,
                    max_length=params.backbone.max_length, seed=params.seed,
                    centroids=baseline_centroids(cfg, params))


def _meta_params(cfg: BenchConfig, params: Params, algorithm: str, out: Path, steps: int | None = None) -> Params:
    meta = {**params.meta.model_dump(), **cfg.meta_overrides_by_algo.get(algorithm, {}),
            "algorithm": algorithm, "output_dir": out}
    if steps is not None:
        meta["steps"] = steps
    return params.model_copy(update={"meta": Meta.model_validate(meta)})


def meta_train(cfg: BenchConfig, params: Params, algorithm: str, curated: Path, manifests: tuple[Path, Path]):
    """metaloop.train.run within cfg.meta_steps and cfg.meta_minutes; the learner at its best step.

    The time limit uses the trainer's own graceful stop (SIGTERM: the step in progress
    finishes, a checkpoint is written); a second call with steps = the step reached resumes
    from that checkpoint and only exports the best model.
    """
    from safetensors.torch import load_model

    from metaloop.meta.checkpoint import Checkpoints
    from metaloop.train import run

    out = cfg.work_dir / "meta" / algorithm
    mp = _meta_params(cfg, params, algorithm, out)
    t0 = time.perf_counter()
    deadline = t0 + 60 * cfg.meta_minutes if cfg.meta_minutes else None
    can_signal = threading.current_thread() is threading.main_thread()
    if deadline and not can_signal:
        _say("--meta-minutes needs the main thread (SIGTERM); only --meta-steps limits this run")
    raised = [False]

    def on_step(step: int, rec: dict) -> None:
        if cfg.verbose or step % 10 == 0:
            val = f" val_acc {rec['val_acc']:.4f}" if "val_acc" in rec else ""
            _say(f"  {algorithm} step {step}: train_acc {rec['train_acc']:.3f} loss {rec['train_loss']:.3f}"
                 f"{val} ({rec['seconds']:.1f}s)")
        if deadline and can_signal and not raised[0] and time.perf_counter() > deadline:
            raised[0] = True
            _say(f"  {algorithm}: --meta-minutes {cfg.meta_minutes} reached at step {step}; stopping")
            signal.raise_signal(signal.SIGTERM)  # metaloop.train's graceful stop

    kw = {"curated": curated, "meta_train": manifests[0], "meta_val": manifests[1], "output_dir": out}
    result = run(mp, resume=cfg.resume, on_step=on_step, **kw)
    if result.interrupted:
        result = run(_meta_params(cfg, params, algorithm, out, steps=result.step), resume=True, **kw)
    seconds = time.perf_counter() - t0
    learner = result.learner
    best = Checkpoints(out / "checkpoints").best(result.best_step)
    if best is not None:
        load_model(learner, str(best / "weights.safetensors"))
    learner.eval()
    info = {"steps": result.step, "best_step": result.best_step, "best_val_acc": result.best_val_acc,
            "stopped_early": result.stopped_early, "resumed_from": result.resumed_from,
            "time_limited": raised[0], "model_dir": str(result.model_dir),
            "meta": mp.meta.model_dump(mode="json", exclude={"output_dir"})}
    return learner, result.model_dir, seconds, info


def pretrain_texts(pool: Pool, domains: list[str]) -> tuple[list[str], list[str]]:
    """Every train row of `domains`, labelled domain/intent."""
    texts, labels = [], []
    for d in sorted(domains):
        for lab in pool.labels(d, "train"):
            ids = pool.rows(d, "train", lab)
            texts += pool.texts(ids)
            labels += [f"{d}/{lab}"] * len(ids)
    return texts, labels


def baseline_centroids(cfg: BenchConfig, params: Params):
    """The centroid classifier of frozen-centroid and supervised-pretrain: params' meta one, or the flags'."""
    from metaloop.meta.head import Centroids

    m = params.meta
    return Centroids(cfg.centroid_metric or m.metric, m.scale,
                     m.label_shots if cfg.label_shots is None else cfg.label_shots)


def run_methods(cfg: BenchConfig, params: Params, pool: Pool, curated: Path, evalset: EvalSet) -> list[MethodRun]:
    runs: list[MethodRun] = []
    bb = params.backbone
    centroids = baseline_centroids(cfg, params)

    def with_head(name: str, method: FrozenCentroid, seconds: float, info: dict) -> None:
        """`name`, then (--head-steps) `name+head`: the same cached embeddings, prototypes fitted."""
        runs.append(score(name, method, evalset, pool, seconds, cfg.verbose, info))
        if cfg.head_steps:
            fit = CentroidHeadFit(method.cache, method.centroids, cfg.head_steps, cfg.head_lr)
            runs.append(score(f"{name}+head", fit, evalset, pool, seconds, cfg.verbose,
                              {**info, "head_steps": cfg.head_steps, "head_lr": cfg.head_lr}))
    needs_manifests = any(m in ALGORITHMS for m in cfg.methods) or "supervised-pretrain" in cfg.methods
    manifests = write_meta_manifests(pool, params) if needs_manifests else None
    for name in cfg.methods:
        _say(f"{name}: start")
        if name == "frozen-centroid":
            model, tok = _backbone(params)
            from metaloop.meta.encoder import Encoder

            method = FrozenCentroid(EmbeddingCache(Encoder(model, bb.pooling), tok, bb.max_length), centroids)
            with_head(name, method, 0.0, {"centroids": asdict(centroids)})
        elif name == "finetune":
            from metaloop.backbone import resolve

            model, tok = _backbone(params)
            method = _finetune_method(cfg, params, model, tok, resolve(bb.name_or_path))
            runs.append(score(name, method, evalset, pool, 0.0, cfg.verbose,
                              {"impl": cfg.ft_impl, "finetune": cfg.finetune.model_dump()}))
        elif name == "supervised-pretrain":
            from metaloop.meta.encoder import Encoder

            model, tok = _backbone(params)
            texts, labels = pretrain_texts(pool, params.domains.meta_train)
            val_eps = read_manifest(manifests[1])[: params.meta.val_episodes] if params.domains.meta_val else []

            def validate(enc: Encoder, tok=tok, val_eps=val_eps) -> float:
                centroid = FrozenCentroid(EmbeddingCache(enc, tok, bb.max_length), centroids)
                return statistics.fmean(centroid.accuracy(e, pool.texts) for e in val_eps)

            pp = cfg.pretrain if cfg.pretrain.minutes or not cfg.meta_minutes else \
                cfg.pretrain.model_copy(update={"minutes": cfg.meta_minutes})
            res = supervised_pretrain(model, tok, texts, labels, pp, validate=validate if val_eps else None,
                                      pooling=bb.pooling, max_length=bb.max_length, seed=params.seed, log=_say)
            folder = cfg.work_dir / "supervised" / "model"
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
            info = {"pretrain": asdict(res), "rows": len(texts), "labels": len(set(labels))}
            # the supervised encoder scored by the same centroid classifier as the meta-learners:
            # separates what its encoder learned from what fine-tuning on the shots adds
            centroid = FrozenCentroid(EmbeddingCache(Encoder(model, bb.pooling), tok, bb.max_length), centroids)
            with_head(f"{name}-centroid", centroid, res.seconds, {**info, "centroids": asdict(centroids)})
            if not cfg.pretrain_centroid_only:
                method = _finetune_method(cfg, params, model, tok, folder)
                runs.append(score(name, method, evalset, pool, res.seconds, cfg.verbose, {**info, "impl": cfg.ft_impl}))
        else:  # a meta-learning algorithm
            learner, model_dir, seconds, info = meta_train(cfg, params, name, curated, manifests)
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model_dir)
            method = MetaLearnerMethod(learner, tok, max_length=bb.max_length)
            if method.centroid is not None:  # ProtoNet: its classifier is a centroid one
                with_head(name, method.centroid, seconds, info)
            else:
                runs.append(score(name, method, evalset, pool, seconds, cfg.verbose, info))
            if cfg.meta_finetune:
                from transformers import AutoModel

                model = AutoModel.from_pretrained(model_dir)
                model.eval()
                runs.append(score(f"{name}+finetune", _finetune_method(cfg, params, model, tok, model_dir),
                                  evalset, pool, seconds, cfg.verbose, {**info, "impl": cfg.ft_impl}))
    hashes = {r.name: r.eval_hash for r in runs}
    if len(set(hashes.values())) != 1:
        raise AssertionError(f"methods were scored on different episodes: {hashes}")
    return runs


# ---------------------------------------------------------------- output


def to_json(report: Report) -> dict:
    ev = report.evalset
    results = []
    for r in report.runs:
        secs = r.eval_seconds()
        for k, s in r.summary().items():
            results.append({"method": r.name, "shots": k, "accuracy": round(s.mean, 2), "ci95": round(s.ci95, 2),
                            "seconds": round(secs[k], 1)})
    per_domain = {r.name: {d: {str(k): round(statistics.fmean(s.accuracy for s in r.scores
                                                            if s.domain == d and s.shots == k), 2)
                               for k in sorted({s.shots for s in r.scores})}
                           for d in ev.domains} for r in report.runs}
    return {
        "target_domains": ev.domains,
        "eval_hash": ev.hash,
        "results": results,
        # provenance (beyond the schema)
        "eval_split": ev.split,
        "eval_hash_by_domain": ev.by_domain,
        "episodes_per_shot": {str(k): v.n for k, v in report.runs[0].summary().items()} if report.runs else {},
        "queries_by_domain": {d: len(next(e for e in ev.episodes if e.domain == d).query_ids) for d in ev.domains},
        "train_seconds": {r.name: round(r.train_seconds, 1) for r in report.runs},
        "per_domain": per_domain,
        "per_episode": [{"method": s.method, "episode": s.episode, "domain": s.domain, "shots": s.shots,
                         "accuracy": round(s.accuracy, 3), "seconds": round(s.seconds, 2)}
                        for r in report.runs for s in r.scores],
        "info": {r.name: r.info for r in report.runs},
        "config": report.config,
        "machine": report.machine,
    }


def format_table(report: Report) -> str:
    ev = report.evalset
    shots = sorted({k for r in report.runs for k in r.summary()})
    n = report.runs[0].summary()[shots[0]].n if report.runs else 0
    draws = n // max(1, len(ev.domains))
    where = "target domains (test split)" if ev.split == "test" else "DEV: meta-val domains (val split)"
    ways = sorted({e.ways for e in ev.episodes})
    lines = [
        (f"few-shot accuracy (%), {'/'.join(map(str, ways))}-way, mean ± 95% CI over {n} episodes per K "
        f"({len(ev.domains)} domains x {draws} support draws); {where}: {', '.join(ev.domains)}"),
        f"eval hash {ev.hash[:16]} (identical for every method)",
        "",
    ]
    head = f"{'method':<24}" + "".join(f"{f'{k}-shot':>16}" for k in shots) + f"{'train s':>10}" + \
        "".join(f"{f'eval s K={k}':>13}" for k in shots) + f"{'total s':>10}"
    lines += [head, "-" * len(head)]
    for r in report.runs:
        s, secs = r.summary(), r.eval_seconds()
        cells = "".join(f"{f'{s[k].mean:6.2f} ± {s[k].ci95:5.2f}':>16}" if k in s else f"{'-':>16}" for k in shots)
        total = r.train_seconds + sum(secs.values())
        lines.append(f"{r.name:<24}{cells}{r.train_seconds:>10.0f}" + "".join(f"{secs.get(k, 0):>13.0f}" for k in shots)
                     + f"{total:>10.0f}")
    m = report.machine
    lines += ["", (f"machine: {m['cpus']} CPUs, torch threads {m['threads']}, load average {m['load_start']} -> "
                  f"{m['load_end']}, wall {m['wall_seconds']:.0f}s")]
    return "\n".join(lines)


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ks = sorted({k for r in report.runs for k in r.summary()})
    dodge = 0.015 * (max(ks) - min(ks) or 1)  # side by side, so the CI bars stay readable
    low = 100.0
    for i, r in enumerate(report.runs):
        s = r.summary()
        xs = sorted(s)
        shift = (i - (len(report.runs) - 1) / 2) * dodge
        ax.errorbar([k + shift for k in xs], [s[k].mean for k in xs], yerr=[s[k].ci95 for k in xs], marker="o",
                    ms=4, capsize=3, label=r.name)
        low = min(low, *(s[k].mean for k in xs))
    ax.set_xticks(ks)
    ax.set_ylim(max(0.0, low - 15.0), 100.0)
    ax.set_xlabel("shots per class (K)")
    ax.set_ylabel("accuracy (%)")
    ev = report.evalset
    ax.set_title(f"{'CLINC150' if ev.split == 'test' else 'DEV (val split)'}: {', '.join(ev.domains)}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------- entry points


def run_benchmark(cfg: BenchConfig) -> Report:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars on every model load
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    keep_freed_memory()  # as metaloop.train does: fine-tuning 45 encoders allocates the same blocks over and over
    load_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    params = bench_params(cfg)
    _say(f"curating {cfg.data} into {params.curation.output_dir}")
    pool, curated = curate_pool(params)
    evalset = build_eval_set(pool, params, cfg.dev)
    _say(f"{len(evalset.episodes)} evaluation episodes ({evalset.split} split of {', '.join(evalset.domains)}), "
         f"hash {evalset.hash[:12]}")
    runs = run_methods(cfg, params, pool, curated, evalset)
    machine = {
        "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "load_start": load_start,
        "load_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    config = {**cfg.model_dump(mode="json"), "resolved_meta": params.meta.model_dump(mode="json"),
              "resolved_episodes": params.episodes.model_dump(mode="json"),
              "backbone": params.backbone.model_dump(mode="json")}
    return Report(evalset, runs, config, machine)


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _kv(items: list[str]) -> tuple[dict, dict]:
    """--meta-set [ALGO.]KEY=VALUE -> (for all, {algo: {...}}); values parsed as YAML scalars."""
    common: dict[str, Any] = {}
    by: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--meta-set {item!r}: expected [ALGO.]KEY=VALUE")
        val = yaml.safe_load(value)
        algo, dot, k = key.partition(".")
        if dot and algo in ALGORITHMS:
            by.setdefault(algo, {})[k] = val
        else:
            common[key] = val
    return common, by


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, argparse.Namespace]:
    d = BenchConfig()
    ap = argparse.ArgumentParser(prog="python bench/fewshot.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--data", type=Path, default=d.data, help=f"CLINC150 JSONL (default {d.data})")
    a("--work-dir", type=Path, default=d.work_dir, help="curated data, manifests, checkpoints (git-ignored)")
    a("--params", type=Path, default=d.params, help="params.yaml whose meta/episodes/backbone are the defaults")
    a("--seed", type=int, default=d.seed)
    a("--targets", type=_csv, default=d.targets, help="held-out target domains (comma-separated)")
    a("--meta-train", type=_csv, default=d.meta_train, help="meta-train domains")
    a("--meta-val", type=_csv, default=d.meta_val, help="meta-val domains (kept out of training)")
    a("--shots", type=lambda s: [int(x) for x in _csv(s)], default=d.shots, help="K values, e.g. 1,5,10")
    a("--draws", type=int, default=d.draws, help="support draws per domain and K")
    a("--methods", type=_csv, default=d.methods, help=f"any of {', '.join((*BASELINES, *ALGORITHMS))}")
    a("--threads", type=int, default=d.threads, help="torch CPU threads")
    a("--backbone", default=None, help="override backbone.name_or_path")
    a("--max-length", type=int, default=None)
    a("--centroid-metric", choices=["sqeuclidean", "cosine"], default=None,
      help="baselines' centroid classifier (default: params.yaml meta.metric)")
    a("--label-shots", type=float, default=None,
      help="class-name weight in the baselines' centroids (default: params.yaml meta.label_shots; 0: unused)")
    a("--meta-steps", type=int, default=d.meta_steps, help="meta-training steps (upper bound)")
    a("--meta-minutes", type=float, default=d.meta_minutes, help="meta-training wall-time budget per algorithm")
    a("--meta-batch", type=int, help="meta.meta_batch_size")
    a("--meta-adapt", choices=["all", "top_k", "head", "lora"], help="meta.adapt")
    a("--top-k", type=int, help="meta.top_k")
    a("--inner-steps", type=int, help="meta.inner_steps")
    a("--inner-lr", type=float, help="meta.inner_lr")
    a("--outer-lr", type=float, help="meta.outer_lr")
    a("--val-every", type=int, help="meta.val_every")
    a("--val-episodes", type=int, help="meta.val_episodes")
    a("--patience", type=int, help="meta.patience (also supervised-pretrain's)")
    a("--meta-ways", type=lambda v: v if v == "all" else int(v),
      help="episodes.ways of meta-train/meta-val episodes (a number or all)")
    a("--meta-shots", type=int, help="episodes.shots of meta-train/meta-val episodes")
    a("--meta-queries", type=int, help="episodes.queries of meta-train/meta-val episodes")
    a("--meta-train-split", choices=["train", "all"],
      help="episodes.meta_train_split: meta-train episodes from the train split (default) or every row")
    a("--meta-set", action="append", default=[], metavar="[ALGO.]KEY=VALUE", help="any meta: key")
    a("--meta-finetune", action="store_true", help="also score <algorithm>+finetune")
    a("--meta-train-packaged", action="store_true",
      help="also meta-train on metaloop's packaged corpus (12 more domains; use --meta-ways all)")
    a("--ft-impl", choices=["pooled", "adapt-fit"], default=d.ft_impl)
    a("--ft-soup", type=int, default=d.ft_soup,
      help="with --ft-impl adapt-fit: average the weights of this many fine-tunings (adapt.soup)")
    a("--ft-epochs", type=int)
    a("--ft-lr", type=float)
    a("--ft-head-lr", type=float)
    a("--ft-batch", type=int)
    a("--ft-scope", choices=["all", "top_k", "head"])
    a("--ft-head", choices=["proto", "random"], help="head initialisation (default proto: the centroid classifier)")
    a("--ft-proto-scale", type=float, help="scale of the prototype head's logits (default 1)")
    a("--ft-no-dropout", action="store_true", help="fine-tune in eval mode (no dropout)")
    a("--ft-interpolate", type=float, help="WiSE-FT: use (1 - a) * start + a * fine-tuned weights (default 1)")
    a("--ft-freeze-word-embeddings", action="store_true",
      help="keep the input word embeddings fixed while fine-tuning")
    a("--ft-classifier", choices=["linear", "centroids", "episodic"],
      help="head to fine-tune: linear (default) or the centroid classifier (--centroid-metric, --label-shots)")
    a("--pretrain-epochs", type=int)
    a("--pretrain-steps", type=int)
    a("--pretrain-minutes", type=float, help="default: --meta-minutes")
    a("--pretrain-lr", type=float)
    a("--head-steps", type=int, default=d.head_steps,
      help="also score each centroid method with its prototypes fitted for this many steps (<method>+head)")
    a("--head-lr", type=float, default=d.head_lr)
    a("--pretrain-centroid-only", action="store_true",
      help="score the supervised encoder with the centroid classifier only (skip its fine-tuning)")
    a("--dev", action="store_true", help="score on the meta-val domains' val split (tuning), not the targets")
    a("--resume", action="store_true", help="reuse meta-training checkpoints in --work-dir")
    a("--json", type=Path, help="write the results as JSON")
    a("--plot", type=Path, help="write accuracy vs shots as a PNG")
    a("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    common, by_algo = _kv(args.meta_set)
    for flag, key in (("meta_batch", "meta_batch_size"), ("meta_adapt", "adapt"), ("top_k", "top_k"),
                      ("inner_steps", "inner_steps"), ("inner_lr", "inner_lr"), ("outer_lr", "outer_lr"),
                      ("val_every", "val_every"), ("val_episodes", "val_episodes"), ("patience", "patience")):
        if getattr(args, flag) is not None:
            common[key] = getattr(args, flag)
    episodes = {k: v for k, v in (("ways", args.meta_ways), ("shots", args.meta_shots),
                                  ("meta_train_split", args.meta_train_split),
                                  ("queries", args.meta_queries)) if v is not None}
    ft = {k: v for k, v in (("epochs", args.ft_epochs), ("lr", args.ft_lr), ("head_lr", args.ft_head_lr),
                            ("batch_size", args.ft_batch), ("scope", args.ft_scope),
                            ("proto_scale", args.ft_proto_scale),
                            ("prototype_head", None if args.ft_head is None else args.ft_head == "proto"),
                            ("dropout", False if args.ft_no_dropout else None),
                            ("freeze_word_embeddings", True if args.ft_freeze_word_embeddings else None),
                            ("interpolate", args.ft_interpolate),
                            ("classifier", args.ft_classifier)) if v is not None}
    pt = {k: v for k, v in (("epochs", args.pretrain_epochs), ("max_steps", args.pretrain_steps),
                            ("minutes", args.pretrain_minutes), ("lr", args.pretrain_lr),
                            ("patience", args.patience)) if v is not None}
    try:
        cfg = BenchConfig(
            data=args.data, work_dir=args.work_dir, params=args.params, seed=args.seed, targets=args.targets,
            meta_train=args.meta_train, meta_val=args.meta_val, shots=args.shots, draws=args.draws,
            methods=args.methods, threads=args.threads, backbone=args.backbone, max_length=args.max_length,
            centroid_metric=args.centroid_metric, label_shots=args.label_shots,
            pretrain_centroid_only=args.pretrain_centroid_only, head_steps=args.head_steps, head_lr=args.head_lr,
            finetune=FinetuneParams(**ft), ft_impl=args.ft_impl, ft_soup=args.ft_soup,
            pretrain=PretrainParams(**pt), meta_steps=args.meta_steps, meta_minutes=args.meta_minutes,
            meta_overrides=common, meta_overrides_by_algo=by_algo, episode_overrides=episodes,
            meta_finetune=args.meta_finetune, packaged_meta_train=args.meta_train_packaged, dev=args.dev, resume=args.resume, verbose=args.verbose,
        )
    except ValidationError as err:
        raise SystemExit(f"bench/fewshot.py: invalid options:\n{err}") from None
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if cfg.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not cfg.data.is_file():
        print(f"bench/fewshot.py: CLINC150 not found at {cfg.data}.\n"
              "It is read at run time from ../shared/data/clinc150/clinc150.jsonl (next to the repository); "
              "put it there or pass --data PATH.", file=sys.stderr)
        return 2
    try:
        report = run_benchmark(cfg)
    except (MetaloopError, ValidationError) as err:
        print(f"bench/fewshot.py: {err}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(report), indent=2) + "\n", encoding="utf-8")
        _say(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        _say(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
