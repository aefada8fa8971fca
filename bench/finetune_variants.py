"""Seed ensembles, weight soups and recomputed prototypes of the production fine-tuning, paired.

Session 9's probe (docs/fewshot.md): for every evaluation episode, `metaloop.adapt.fit`
(the centroid classifier, as the main job adapts) runs once per seed from one encoder, and
each query set is scored as

    A<seed>     the fine-tuned model as it is (its trained class vectors)
    B<seed>     the same encoder, class vectors recomputed as prototypes (names included)
    AB<seed>    the mean of A's and B's logits
    ensA<n>     mean softmax of the first n seeds' A (an n-model ensemble)
    soup<n>     one model holding the mean of the first n seeds' weights (= adapt.soup: n)

With --second-init (`pretrained` or a model folder), each episode is also fine-tuned from
that encoder with the first seed (session 10: do two inits make different errors?):

    X           the second init's fine-tuned model (from `pretrained`: baseline (b)'s production run)
    ensAX       mean softmax of A<first seed> and X
    soupAX      one model holding the mean of their weights

With --logits PATH, the first seed's query logits (column A) are written per episode to an npz
file, for bench/cross_encoder.py --fuse.

The episodes, encoder and fine-tuning settings are bench/fewshot.py's, from the same flags
(give them after the probe's own). Dev (the meta-val domain's val split) unless --targets.

    .venv/bin/python bench/finetune_variants.py --seeds 13,14,15 --json bench/results/s9/variants.json -- \\
        --params /tmp/params-s3.yaml --threads 2 --meta-set metric=cosine --meta-set label_shots=1 \\
        --meta-set scale=20 --work-dir bench/results/s4/ft-work --ft-classifier centroids --ft-impl adapt-fit

It reads the ProtoNet encoder that bench/fewshot.py exported under --work-dir (run that first).
Prints the mean per shot count of every column and its paired difference from A<first seed>
(the production single run) with a 95% interval.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewshot import _finetune_method, bench_params, build_eval_set, curate_pool, parse_args

from metaloop.adapt import (
    Examples,
    fit,
    mean_weights,
    predict_logits,
    prototype_init,
    torch_threads,
)
from fewshot_eval import mean_ci95


def score_episode(ep, pool, init, ap, cent, max_length, pooling, seeds, threads, second=None, logits=None) -> dict:
    labels = list(ep.labels)
    support = Examples(pool.texts(ep.support_ids), [labels[y] for y in ep.support_y])
    queries, y = pool.texts(ep.query_ids), torch.tensor(ep.query_y)

    def acc(logits):
        return float((logits.argmax(-1) == y).float().mean())

    row: dict = {"episode": ep.id, "domain": ep.domain, "shots": len(ep.support_ids) // ep.ways}
    probs, states = [], []
    t0 = time.perf_counter()
    for n, seed in enumerate(seeds, 1):
        model, tok, _ = fit(init, support, labels, ap, max_length=max_length, seed=seed, centroids=cent,
                            pooling=pooling)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        with torch_threads(threads):
            a = predict_logits(model, tok, queries, max_length)
            prototype_init(model, tok, support, labels, max_length)
            b = predict_logits(model, tok, queries, max_length)
        row[f"A{seed}"], row[f"B{seed}"], row[f"AB{seed}"] = acc(a), acc(b), acc(a + b)
        if logits is not None and n == 1:
            logits[ep.id] = a.float().numpy()
        probs.append(a.softmax(-1))
        row[f"ensA{n}"] = acc(sum(probs))
        if n > 1:  # the same average adapt.soup keeps
            model.load_state_dict(mean_weights(states))
            with torch_threads(threads):
                row[f"soup{n}"] = acc(predict_logits(model, tok, queries, max_length))
    if second is not None:
        model, tok, _ = fit(second, support, labels, ap, max_length=max_length, seed=seeds[0], centroids=cent,
                            pooling=pooling)
        with torch_threads(threads):
            x = predict_logits(model, tok, queries, max_length)
            model.load_state_dict(mean_weights([states[0], model.state_dict()]))
            row["X"], row["ensAX"] = acc(x), acc(probs[0] + x.softmax(-1))
            row["soupAX"] = acc(predict_logits(model, tok, queries, max_length))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def summary(rows: list[dict], base: str) -> str:
    cols = [k for k in rows[0] if k not in ("episode", "domain", "shots", "seconds")]
    lines = []
    for k in sorted({r["shots"] for r in rows}):
        rs = [r for r in rows if r["shots"] == k]
        lines.append(f"{k}-shot ({len(rs)} episodes)")
        for c in cols:
            d = mean_ci95([100 * (r[c] - r[base]) for r in rs])
            lines.append(f"  {c:>8} {100 * statistics.fmean(r[c] for r in rs):6.2f}  {d.mean:+.2f} ± {d.ci95:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, rest = _split(argv)
    ap = argparse.ArgumentParser(prog="python bench/finetune_variants.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="13,14,15", help="fine-tuning seeds; the first is the baseline")
    ap.add_argument("--targets", action="store_true", help="score the target domains' test episodes (not dev)")
    ap.add_argument("--json", type=Path, help="write the per-episode rows")
    ap.add_argument("--logits", type=Path, help="write the first seed's query logits per episode (npz)")
    ap.add_argument("--second-init", help="also fine-tune from this encoder: `pretrained` (the backbone) or a folder")
    args = ap.parse_args(own)
    cfg, _ = parse_args([*rest, *([] if args.targets else ["--dev"])])
    if cfg.ft_impl != "adapt-fit" or cfg.finetune.classifier != "centroids":
        raise SystemExit("give the production fine-tuning: --ft-impl adapt-fit --ft-classifier centroids")
    params = bench_params(cfg)
    pool, _ = curate_pool(params)
    ev = build_eval_set(pool, params, dev=not args.targets)
    init = cfg.work_dir / "meta" / "protonet" / "model"
    if not (init / "config.json").is_file():
        raise SystemExit(f"no ProtoNet encoder at {init}: run bench/fewshot.py --methods protonet with this --work-dir")
    production = _finetune_method(cfg, params, None, None, init)  # the harness's adapt.fit settings
    seeds = [int(s) for s in args.seeds.split(",")]
    second = None
    if args.second_init:
        from metaloop.backbone import resolve

        second = resolve(params.backbone.name_or_path) if args.second_init == "pretrained" else args.second_init
    print(f"{len(ev.episodes)} episodes ({ev.split} split of {', '.join(ev.domains)}), eval hash {ev.hash[:12]}",
          flush=True)
    rows, logits = [], {}
    for ep in ev.episodes:
        rows.append(score_episode(ep, pool, init, production.params, production.centroids,
                                  params.backbone.max_length, params.backbone.pooling, seeds, cfg.threads, second,
                                  logits))
        print(f"{ep.id}: A{seeds[0]} {100 * rows[-1][f'A{seeds[0]}']:.2f} ({rows[-1]['seconds']}s)", flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"eval_hash": ev.hash, "seeds": seeds, "rows": rows}, indent=1) + "\n")
    if args.logits:
        np.savez(args.logits, **logits)
    print(summary(rows, f"A{seeds[0]}"))
    return 0


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the probe's own flags, bench/fewshot.py's flags after `--`)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


if __name__ == "__main__":
    sys.exit(main())
