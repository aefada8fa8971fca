"""A cross-encoder matcher (DNNC-style), meta-trained on the source domains, scored on the eval episodes.

Session 11's probe for issue 4 (docs/fewshot.md). Every method before it compared a query
with a class through two separate embeddings. A cross-encoder reads the query and one support
row (or the class name) as one input, so every layer attends across the two. It is trained on
15-way 1-shot episodes of the meta-train domains (each class's support is one of its rows, or
its name with probability --name-p), with a cross-entropy over the query's 15 pair scores. A
class scores the mean of its supports' pair scores, the name being one of them.

    pair score = scale * cos(mean of the query's token states, mean of the support's)
                 + w . mean of all token states

Both means come from the one joint pass; w starts at zero, so the untrained matcher is the
encoder's cosine read through that pass.

    F="--params /tmp/params-s3.yaml --threads 2 --work-dir bench/results/s4/ft-work \\
       --meta-set metric=cosine --meta-set label_shots=1 --meta-set scale=20"
    # 1. train (20 min on 2 threads), from the ProtoNet encoder bench/fewshot.py exported under --work-dir
    .venv/bin/python bench/cross_encoder.py train --minutes 20 --out bench/results/s11/cross -- $F
    # 2. the production fine-tuning's logits on the same episodes, then score and fuse
    .venv/bin/python bench/finetune_variants.py --seeds 13 --logits bench/results/s11/ft-dev.npz -- $F \\
        --ft-classifier centroids --ft-impl adapt-fit
    .venv/bin/python bench/cross_encoder.py score --out bench/results/s11/cross \\
        --fuse bench/results/s11/ft-dev.npz -- $F

Dev (the meta-val domain's val split) unless --targets. `score` prints the matcher's accuracy
per shot count and, with --fuse, the paired difference of (1 - a) p_finetune + a p_cross from
the fine-tuning alone for several a.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewshot import bench_params, build_eval_set, curate_pool, parse_args
from finetune_variants import _split
from transformers import AutoModel, AutoTokenizer

from fewshot_eval import mean_ci95
from metaloop.meta.head import label_text

WEIGHTS = "cross.safetensors"
FUSE = (0.2, 0.35, 0.5)


class CrossMatcher(nn.Module):
    """One joint pass over (query, support): the cosine of the two segments' mean states, plus w."""

    def __init__(self, encoder: str | Path, scale: float = 20.0):
        super().__init__()
        self.encoder = AutoModel.from_pretrained(encoder)
        self.w = nn.Linear(self.encoder.config.hidden_size, 1)
        nn.init.zeros_(self.w.weight)
        nn.init.zeros_(self.w.bias)
        self.scale = scale

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"]).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        second = batch["token_type_ids"].unsqueeze(-1).float() * mask
        first = mask - second

        def mean(m):
            return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

        return self.scale * F.cosine_similarity(mean(first), mean(second), dim=-1) + self.w(mean(mask)).squeeze(-1)


def _pairs(tok, pairs: list[tuple[str, str]], max_length: int) -> dict[str, torch.Tensor]:
    return tok([p[0] for p in pairs], [p[1] for p in pairs], padding=True, truncation=True, max_length=max_length,
               return_tensors="pt")


def train(params, pool, out: Path, init: Path, minutes: float, steps: int, name_p: float, queries: int,
          lr: float, seed: int) -> dict:
    """Meta-train the matcher on meta-train 1-shot episodes (all of a domain's labels); save it to `out`."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    rows = {d: {lab: pool.texts(pool.rows(d, "train", lab)) for lab in pool.labels(d, "train")}
            for d in params.domains.meta_train}
    rows = {d: by for d, by in rows.items() if len(by) > 1 and all(len(r) > queries for r in by.values())}
    if not rows:
        raise SystemExit(f"no meta-train domain has 2+ labels with {queries + 1}+ train rows each")
    tok, model = AutoTokenizer.from_pretrained(init), CrossMatcher(init).train()
    opt = torch.optim.AdamW([{"params": model.encoder.parameters(), "lr": lr},
                             {"params": model.w.parameters(), "lr": 1e-3}], weight_decay=0.01)
    t0, losses, step = time.time(), [], 0
    while step < steps and time.time() - t0 < minutes * 60:
        domain = rng.choice(sorted(rows))
        support, qs = [], []
        for c, lab in enumerate(sorted(rows[domain])):
            drawn = rng.sample(rows[domain][lab], 1 + queries)
            support.append(label_text(lab) if rng.random() < name_p else drawn[0])
            qs += [(q, c) for q in drawn[1:]]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores = model(_pairs(tok, [(q, s) for q, _ in qs for s in support], params.backbone.max_length))
        loss = F.cross_entropy(scores.view(len(qs), len(support)), torch.tensor([c for _, c in qs]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            print(f"step {step} {time.time() - t0:.0f}s loss {statistics.fmean(losses[-20:]):.3f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS)
    tok.save_pretrained(out)
    info = {"init": str(init), "steps": step, "seconds": round(time.time() - t0, 1), "losses": losses,
            "name_p": name_p, "queries": queries, "lr": lr, "seed": seed}
    (out / "cross.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


@torch.inference_mode()
def score(params, pool, evalset, out: Path, batch_size: int = 512) -> dict[str, np.ndarray]:
    """Per episode, a (queries x ways) array of class scores: the mean over a class's supports and name."""
    info = json.loads((out / "cross.json").read_text())
    tok, model = AutoTokenizer.from_pretrained(out), CrossMatcher(info["init"])
    model.load_state_dict(load_file(out / WEIGHTS))
    model.eval()
    cache: dict[tuple[str, str], float] = {}  # every episode of a domain shares its queries
    result = {}
    for ep in evalset.episodes:
        support = [*zip(pool.texts(ep.support_ids), ep.support_y),
                   *((label_text(lab), c) for c, lab in enumerate(ep.labels))]
        queries = pool.texts(ep.query_ids)
        todo = sorted({(q, s) for q in queries for s, _ in support} - cache.keys(), key=lambda p: len(p[0] + p[1]))
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                cache.update(zip(chunk, model(_pairs(tok, chunk, params.backbone.max_length)).float().tolist()))
        pair = np.array([[cache[(q, s)] for s, _ in support] for q in queries])
        cls = np.array([c for _, c in support])
        result[ep.id] = np.stack([pair[:, cls == c].mean(1) for c in range(len(ep.labels))], 1)
    return result


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def report(evalset, cross: dict[str, np.ndarray], finetune: dict[str, np.ndarray] | None) -> list[dict]:
    """Accuracy per shot count of the matcher, and of each fusion paired against the fine-tuning alone."""
    lines = []
    for k in sorted({len(e.support_ids) // e.ways for e in evalset.episodes}):
        eps = [e for e in evalset.episodes if len(e.support_ids) // e.ways == k]

        def acc(p, e):
            return 100 * float((p.argmax(1) == np.array(e.query_y)).mean())

        row = {"shots": k, "episodes": len(eps), "cross": statistics.fmean(acc(cross[e.id], e) for e in eps)}
        if finetune is not None:
            base = [acc(finetune[e.id], e) for e in eps]
            row["finetune"] = statistics.fmean(base)
            for a in FUSE:
                fused = [acc((1 - a) * _softmax(finetune[e.id]) + a * _softmax(cross[e.id]), e) for e in eps]
                d = mean_ci95([f - b for f, b in zip(fused, base)])
                row[f"fused{a}"] = (statistics.fmean(fused), d.mean, d.ci95)
        lines.append(row)
    return lines


def main(argv: list[str] | None = None) -> int:
    own, rest = _split(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python bench/cross_encoder.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["train", "score"])
    ap.add_argument("--out", type=Path, required=True, help="the matcher's folder")
    ap.add_argument("--init", type=Path, help="encoder to start from (default: the ProtoNet under --work-dir)")
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--steps", type=int, default=10**9)
    ap.add_argument("--name-p", type=float, default=0.25, help="chance a class's training support is its name")
    ap.add_argument("--queries", type=int, default=2, help="queries per class per training episode")
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--targets", action="store_true", help="score the target domains' test episodes (not dev)")
    ap.add_argument("--fuse", type=Path, help="npz of fine-tuning logits (bench/finetune_variants.py --logits)")
    ap.add_argument("--npz", type=Path, help="write the matcher's class scores per episode")
    args = ap.parse_args(own)
    cfg, _ = parse_args([*rest, *([] if args.targets else ["--dev"])])
    params = bench_params(cfg)
    pool, _ = curate_pool(params)
    torch.set_num_threads(cfg.threads)
    if args.action == "train":
        init = args.init or cfg.work_dir / "meta" / "protonet" / "model"
        if not (init / "config.json").is_file():
            raise SystemExit(f"no encoder at {init}: run bench/fewshot.py --methods protonet first, or give --init")
        info = train(params, pool, args.out, init, args.minutes, args.steps, args.name_p, args.queries,
                     args.lr, cfg.seed)
        print(f"trained {info['steps']} steps in {info['seconds']} s -> {args.out}")
        return 0
    ev = build_eval_set(pool, params, dev=not args.targets)
    print(f"{len(ev.episodes)} episodes ({ev.split} split of {', '.join(ev.domains)}), eval hash {ev.hash[:12]}",
          flush=True)
    cross = score(params, pool, ev, args.out)
    if args.npz:
        np.savez(args.npz, **cross)
    finetune = None
    if args.fuse:
        with np.load(args.fuse) as z:
            finetune = {k: z[k] for k in z.files}
        if set(finetune) != {e.id for e in ev.episodes}:
            raise SystemExit(f"{args.fuse} holds other episodes than these: run finetune_variants with the same flags")
    for row in report(ev, cross, finetune):
        text = f"{row['shots']}-shot ({row['episodes']} episodes): cross {row['cross']:.2f}"
        if finetune is not None:
            text += f"  finetune {row['finetune']:.2f}" + "".join(
                f"  a={a}: {row[f'fused{a}'][0]:.2f} ({row[f'fused{a}'][1]:+.2f} ± {row[f'fused{a}'][2]:.2f})"
                for a in FUSE)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
