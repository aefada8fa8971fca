"""Benchmark: one meta-training step of all-MiniLM-L6-v2 on a 5-way 5-shot 15-query episode.

    python bench/meta_step.py                          # every row, prints a table
    python bench/meta_step.py --rows reference,default --json bench/results/meta_step.json

The episode is drawn (fixed seed) from one domain of the packaged corpus (real short
texts); every row runs 5 inner steps. Each row runs in its own process, so `peak_mb` is
that process's peak resident memory, and is timed after one warm-up step (the first step
also pays for first-touch memory and kernel setup).

rows
  reference     second-order MAML, every parameter adapted, fp32, inputs padded to 64 tokens,
                in metaloop (torch.func.functional_call) and in `higher` (monkeypatch), the
                same math; their meta-gradients must agree (relative difference <= 1e-4).
                `higher` is needed only here: pip install higher (never a project dependency).
  checkpointed  the reference with metaloop's memory savers: inner steps replayed one at a
                time in the backward pass (meta.activation_checkpointing) and the outer loss
                15 queries at a time (meta.query_chunk); the same meta-gradient.
  default       the same algorithm under params.yaml's meta/backbone settings where given,
                else DEFAULT below: dynamic padding in length groups (meta.length_groups),
                top-2 layers adapted (the four lower layers run once per episode, not once per
                inner step), bf16 autocast.
  scaling       the default step under torchrun with 1 and 2 ranks, one thread per rank, the
                same outer steps of 2 episodes both times (1 rank runs both, 2 ranks one
                each, as metaloop.train splits a meta-batch): episodes per second, gloo
                all-reduce and Adam included.

Every row's process, `higher`'s too, keeps freed memory as metaloop's training processes do
(metaloop.memory.keep_freed_memory: glibc malloc reuses it instead of page-faulting it in
again every step).

GFLOP/s counts the FLOPs really executed (torch.utils.flop_counter, forward, backward and
double backward, for the tokens actually processed, padding included where it is padded)
against the matrix-product peak of the row's precision, measured first on 2048x2048 fp32 and
bf16 products. --json PATH writes {"peak_gflops": {"fp32", "bf16"}, "rows": [{"impl",
"algorithm", "config", "seconds_per_step", "peak_mb", "gflops_per_s", ...}], "scaling":
{"ranks": [1, 2], "episodes_per_s": [...]}}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

DEFAULT = {"adapt": "top_k", "top_k": 2, "bf16": True, "padding": "longest", "max_length": 64, "length_groups": 2,
           "query_chunk": 0}
WAYS, SHOTS, QUERIES, INNER_STEPS, INNER_LR = 5, 5, 15, 5, 0.01
QUERY_CHUNK = 15  # checkpointed row: the outer loss 15 queries at a time


# ---------------------------------------------------------------- episode and models


def episode(tokenizer, padding: str, max_length: int, seed: int = 0):
    from metaloop.meta.data import EpisodeBatch, tokenize

    rows = [json.loads(l) for l in (ROOT / "metaloop" / "corpus" / "it_helpdesk.jsonl").read_text().splitlines() if l]
    rng = random.Random(seed)
    by_label: dict[str, list[str]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r["text"])
    labels = rng.sample(sorted(by_label), WAYS)
    s_text, s_y, q_text, q_y = [], [], [], []
    for y, label in enumerate(labels):
        picked = rng.sample(by_label[label], SHOTS + QUERIES)
        s_text += picked[:SHOTS]
        s_y += [y] * SHOTS
        q_text += picked[SHOTS:]
        q_y += [y] * QUERIES
    return EpisodeBatch(tokenize(tokenizer, s_text, max_length, padding), torch.tensor(s_y),
                        tokenize(tokenizer, q_text, max_length, padding), torch.tensor(q_y), WAYS)


def default_settings() -> dict:
    settings = dict(DEFAULT)
    path = ROOT / "params.yaml"
    if path.is_file():
        from metaloop.config import load_params

        p = load_params(path)
        fields = p.meta.model_fields_set
        keys = ("adapt", "top_k", "bf16", "length_groups", "query_chunk")
        settings.update({k: getattr(p.meta, k) for k in keys if k in fields})
        settings["max_length"] = p.backbone.max_length
    return settings


def learner_for(config: str):
    from metaloop.backbone import load_backbone
    from metaloop.meta import LearnerConfig, build_learner

    model, tok = load_backbone("packaged:all-MiniLM-L6-v2")
    model.train()
    saver = config == "checkpointed"
    s = default_settings() if config == "default" else \
        {"adapt": "all", "top_k": 2, "length_groups": 1, "query_chunk": QUERY_CHUNK if saver else 0}
    cfg = LearnerConfig(algorithm="maml", adapt=s["adapt"], top_k=s["top_k"], inner_steps=INNER_STEPS,
                        inner_lr=INNER_LR, checkpointing=saver, query_chunk=s["query_chunk"],
                        length_groups=s["length_groups"])
    for m in model.modules():  # dropout off: the two implementations must see the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return build_learner(model, cfg), tok


# ---------------------------------------------------------------- one step, two implementations


def metaloop_step(learner, batch, bf16: bool):
    learner.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        learner.outer_backward(batch)


def higher_step(learner, batch):
    """Second-order MAML with `higher`'s functional model, same math as metaloop's inner loop."""
    import higher
    import torch.nn.functional as F

    from metaloop.meta.encoder import attention_for
    from metaloop.meta.head import head_logits, proto_head
    from metaloop.meta.pooling import pool

    model = learner.encoder.model
    fmodel = higher.monkeypatch(model, copy_initial_weights=False, track_higher_grads=True)
    params = list(model.parameters())
    learner.zero_grad(set_to_none=True)

    def embed(inputs, ps):
        return pool(fmodel(**inputs, params=ps).last_hidden_state, inputs["attention_mask"], "mean")

    with attention_for(True):
        fast = params
        z = embed(batch.support, fast)
        head = proto_head(z.view_as(z), batch.support_y, batch.ways)
        for step in range(INNER_STEPS):
            if step:
                z = embed(batch.support, fast)
            z_in = z.view_as(z)
            loss = F.cross_entropy(head_logits(head, z_in), batch.support_y)
            g_z, g_w, g_b = torch.autograd.grad(loss, [z_in, head["weight"], head["bias"]], create_graph=True)
            g = torch.autograd.grad(z_in, fast, grad_outputs=g_z, create_graph=True, allow_unused=True)
            fast = [p if gi is None else p - INNER_LR * gi for p, gi in zip(fast, g)]
            head = {"weight": head["weight"] - INNER_LR * g_w, "bias": head["bias"] - INNER_LR * g_b}
    logits = head_logits(head, embed(batch.query, fast))
    F.cross_entropy(logits, batch.query_y).backward()


# ---------------------------------------------------------------- a row, in its own process


class FlopCount(TorchDispatchMode):
    """FLOPs of every op executed (torch's flop formulas), without FlopCounterMode's module
    tracking, whose backward hooks refuse `torch.autograd.grad` (the inner loop's)."""

    total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def worker(impl: str, config: str, repeat: int, grads_out: str | None) -> dict:
    from metaloop.memory import keep_freed_memory

    keep_freed_memory()  # for every implementation, as metaloop.train does
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    learner, tok = learner_for(config)
    s = default_settings() if config == "default" else {"padding": "max_length", "max_length": 64, "bf16": False}
    batch = episode(tok, s["padding"], s["max_length"])
    step = (lambda: higher_step(learner, batch)) if impl == "higher" else (lambda: metaloop_step(learner, batch, s["bf16"]))
    step()  # warm-up: the first step also pays for first-touch memory and kernel setup
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if grads_out:
        from safetensors.torch import save_file

        save_file({n: p.grad.contiguous() for n, p in learner.named_parameters() if p.grad is not None}, grads_out)
    flops = None
    if impl == "metaloop":
        with FlopCount() as counter:
            step()
        flops = counter.total
    tokens = int(batch.support["attention_mask"].numel() + batch.query["attention_mask"].numel())
    return {"impl": impl, "algorithm": "maml", "config": config, "seconds_per_step": min(times),
            "peak_mb": round(peak_mb, 1), "flops": flops, "precision": "bf16" if s["bf16"] else "fp32",
            "tokens_per_set": tokens}


def scaling_worker(episodes: int, out: str, meta_batch: int = 2) -> None:
    """Episodes 0..episodes-1 of one fixed list in outer steps of `meta_batch` episodes, split
    across ranks as the trainer splits them (episode j of a step on rank j % world): 1 and 2 ranks
    take the same optimizer steps on the same episodes (a rank-seeded draw would give the 2-rank
    run other, longer or shorter, texts)."""
    from metaloop.memory import keep_freed_memory
    from metaloop.meta import dist as D

    keep_freed_memory()
    ctx = D.setup()
    torch.set_num_threads(1)
    learner, tok = learner_for("default")
    s = default_settings()
    steps = episodes // meta_batch
    mine = [[episode(tok, s["padding"], s["max_length"], seed=i * meta_batch + j)
             for j in range(ctx.rank, meta_batch, ctx.world)] for i in range(steps)]
    warm = [episode(tok, s["padding"], s["max_length"], seed=10_000 + ctx.rank)]
    params = learner.meta_parameters()
    opt = torch.optim.Adam(params, lr=1e-5, fused=True)  # as metaloop.train builds it

    spent = {"compute": 0.0, "sync": 0.0}  # sync includes waiting for the slower rank

    def step(batches):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16) if s["bf16"] else contextlib.nullcontext():
            for b in batches:
                learner.outer_backward(b, weight=1.0 / meta_batch)
        t_sync = time.perf_counter()
        D.sync_grads(params, ctx, learner.row_sparse_parameters())
        opt.step()
        spent["compute"] += t_sync - t
        spent["sync"] += time.perf_counter() - t_sync

    step(warm)
    D.barrier(ctx)
    spent.update(compute=0.0, sync=0.0)
    t0 = time.perf_counter()
    for batches in mine:
        step(batches)
    D.barrier(ctx)
    seconds = time.perf_counter() - t0
    per_rank = D.all_gather_object({k: round(v, 2) for k, v in spent.items()}, ctx)
    if ctx.is_main:
        Path(out).write_text(json.dumps({"ranks": ctx.world, "episodes_per_s": steps * meta_batch / seconds,
                                         "seconds": seconds, "per_rank": per_rank}))
    D.teardown(ctx)


# ---------------------------------------------------------------- driver


def peak_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 8) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def run_row(impl: str, config: str, repeat: int, grads_out: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", f"{impl}:{config}", "--repeat", str(repeat)]
    if grads_out:
        cmd += ["--grads-out", grads_out]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{impl}:{config} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def grad_difference(a_path: str, b_path: str) -> float:
    from safetensors.torch import load_file

    a, b = load_file(a_path), load_file(b_path)
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in b)
    den = sum(float(b[k].pow(2).sum()) for k in b)
    return (num / den) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="reference,checkpointed,default,scaling")
    ap.add_argument("--repeat", type=int, default=1, help="timed steps per row after one warm-up (best is reported)")
    ap.add_argument("--scaling-episodes", type=int, default=8, help="episodes each scaling run processes")
    ap.add_argument("--threads", type=int, default=2, help="threads for the single-process rows")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--grads-out", help=argparse.SUPPRESS)
    ap.add_argument("--scaling-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        impl, config = args.worker.split(":")
        print(json.dumps(worker(impl, config, args.repeat, args.grads_out)))
        return
    if args.scaling_worker:
        scaling_worker(args.scaling_episodes, args.scaling_worker)
        return

    os.environ["BENCH_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    peak = {"fp32": peak_gflops(torch.float32), "bf16": peak_gflops(torch.bfloat16)}
    wanted = args.rows.split(",")
    rows, extra = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        if "reference" in wanted:
            rows.append(run_row("metaloop", "reference", args.repeat, f"{tmp}/ml.safetensors"))
            try:
                import higher  # noqa: F401

                rows.append(run_row("higher", "reference", args.repeat, f"{tmp}/hi.safetensors"))
                rows[-1]["flops"] = rows[-2]["flops"]  # the same math
                extra["grad_rel_diff"] = grad_difference(f"{tmp}/ml.safetensors", f"{tmp}/hi.safetensors")
            except ImportError:
                print("higher is not installed: pip install higher (for this benchmark only)", file=sys.stderr)
        for config in ("checkpointed", "default"):
            if config in wanted:
                rows.append(run_row("metaloop", config, args.repeat if config != "default" else 3))
        scaling = None
        if "scaling" in wanted:
            scaling = {"ranks": [1, 2], "episodes_per_s": []}
            for n in (1, 2):
                out = f"{tmp}/scaling-{n}.json"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                       __file__, "--scaling-worker", out, "--scaling-episodes", str(args.scaling_episodes)]
                subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                result = json.loads(Path(out).read_text())
                scaling["episodes_per_s"].append(result["episodes_per_s"])
                scaling.setdefault("per_rank_seconds", []).append(result["per_rank"])

    for r in rows:
        r["gflops_per_s"] = r["flops"] / r["seconds_per_step"] / 1e9 if r.get("flops") else None
        r["peak_fraction"] = r["gflops_per_s"] / peak[r["precision"]] if r["gflops_per_s"] else None
    report(peak, rows, scaling, extra)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"peak_gflops": peak, "rows": rows, "scaling": scaling, **extra}, indent=2))


def report(peak: dict, rows: list[dict], scaling: dict | None, extra: dict) -> None:
    print(f"matrix-product peak: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads)")
    print(f"{'impl':9} {'config':13} {'s/step':>8} {'episodes/s':>10} {'peak MB':>8} {'GFLOP/s':>8} {'of peak':>8}")
    for r in rows:
        g = f"{r['gflops_per_s']:.0f}" if r["gflops_per_s"] else "-"
        f = f"{100 * r['peak_fraction']:.0f}% {r['precision']}" if r["peak_fraction"] else "-"
        print(f"{r['impl']:9} {r['config']:13} {r['seconds_per_step']:8.2f} {1 / r['seconds_per_step']:10.3f} "
              f"{r['peak_mb']:8.0f} {g:>8} {f:>8}")
    by = {(r["impl"], r["config"]): r for r in rows}
    ref = by.get(("metaloop", "reference"))
    if ref and ("higher", "reference") in by:
        hi = by[("higher", "reference")]
        print(f"metaloop vs higher: {hi['seconds_per_step'] / ref['seconds_per_step']:.2f}x faster, "
              f"meta-gradient relative difference {extra.get('grad_rel_diff', float('nan')):.1e}")
        if ("metaloop", "checkpointed") in by:
            ck = by[("metaloop", "checkpointed")]
            print(f"checkpointed: {ck['peak_mb'] / hi['peak_mb']:.2f}x higher's peak memory at "
                  f"{ck['seconds_per_step'] / ref['seconds_per_step']:.2f}x the reference time")
    if ref and ("metaloop", "default") in by:
        print(f"default: {ref['seconds_per_step'] / by[('metaloop', 'default')]['seconds_per_step']:.1f}x "
              "the episodes per second of the reference")
    if scaling and len(scaling["episodes_per_s"]) == 2:
        one, two = scaling["episodes_per_s"]
        print(f"scaling (1 thread per rank): 1 rank {one:.3f}, 2 ranks {two:.3f} episodes/s ({two / one:.2f}x)")
        for n, ranks in zip(scaling["ranks"], scaling.get("per_rank_seconds", [])):
            print(f"  {n} rank(s), seconds per rank (compute / all-reduce + Adam + waiting): "
                  + ", ".join(f"{r['compute']:.1f} / {r['sync']:.1f}" for r in ranks))


if __name__ == "__main__":
    main()
