"""The benchmark's command line: flags into a validated `BenchConfig`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .finetune import FinetuneParams
from .pretrain import PretrainParams
from .setup import ALGORITHMS, BASELINES, BenchConfig


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
