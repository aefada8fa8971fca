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
                       a fixed number of epochs (`fewshot_eval.Finetune`). --ft-impl adapt-fit
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

import json
import logging
import os
import platform
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # fewshot_eval, also when loaded by path (tests)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from pydantic import ValidationError

from fewshot_eval.args import parse_args
from fewshot_eval.finetune import Finetune, MetaLearnerMethod
from fewshot_eval.methods import CentroidHeadFit, EmbeddingCache, FrozenCentroid, score_episodes
from fewshot_eval.pretrain import supervised_pretrain
from fewshot_eval.report import format_table, MethodRun, plot, Report, to_json
from fewshot_eval.setup import ALGORITHMS, bench_params, BenchConfig, build_eval_set, curate_pool, EvalSet, write_meta_manifests
from metaloop.config import (
    Meta,
    Params,
)
from metaloop.episode_sets import eval_hash
from metaloop.memory import keep_freed_memory
from metaloop.episodes import (
    Pool,
    read_manifest,
)
from metaloop.errors import MetaloopError




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
        from fewshot_eval import AdaptFitMethod

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
