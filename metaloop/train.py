"""Meta-training: the one entry point, for one process or many under torchrun.

    python -m metaloop.train --params params.yaml             # this process is the whole job
    torchrun --nproc-per-node 2 -m metaloop.train --params params.yaml
    python -m metaloop.train --params params.yaml --launch    # torchrun with params.meta's
                                                              # nproc/nnodes/rdzv/max_restarts

What a step does. The meta-train manifest is read as an endless stream: pass e of the
stream is a permutation of the manifest seeded by (seed, e). Step t takes the stream's
episodes [t*B, (t+1)*B) for B = meta.meta_batch_size; rank r of W takes those with
j % W == r, runs the algorithm's outer backward on each (loss scaled by 1/B), gradients
are summed over ranks (so every rank sees the mean over the whole meta-batch), and every
rank takes the same optimizer step: parameters stay identical on all ranks, and the
episodes a step sees do not depend on W. Dropout noise is seeded by (seed, step, rank).

Checkpoints (every meta.checkpoint_every steps, on SIGTERM and at the end) hold the
weights, optimizer state, RNG states, step and stream position; a restarted job (by hand,
or torchrun --max-restarts after a rank died) resumes from the last one and replays
exactly. A run whose params or data changed does not resume: its stale checkpoints are
removed. Meta-validation every meta.val_every steps scores meta.val_episodes meta-val
episodes; the best is kept, and meta.patience validations without improvement stop the
run. The best (or, with no meta-val episodes, the last) weights are exported to
<output_dir>/model (see `metaloop.meta.checkpoint.export_model`), with metrics.jsonl and
summary.json beside it.

Multi-node runs need output_dir on storage every node sees. What a run reads is checked in
`metaloop.train_inputs` (`preflight`); starting torchrun is `metaloop.launch`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_model

from metaloop.backbone import load_backbone
from metaloop.config import Params, load_params
from metaloop.errors import MetaloopError
from metaloop.launch import ERROR_FILE_ENV, launch
from metaloop.memory import keep_freed_memory
from metaloop.train_inputs import EpisodeStream, fingerprint, preflight, read_inputs
from metaloop.meta import dist as D
from metaloop.meta.algorithms import LearnerConfig, MetaLearner, build_learner
from metaloop.meta.checkpoint import Checkpoints, export_model, rng_state, set_rng_state
from metaloop.meta.data import episode_batch

log = logging.getLogger("metaloop.train")


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path
    step: int  # last step trained
    best_step: int | None
    best_val_loss: float | None
    best_val_acc: float | None
    stopped_early: bool
    interrupted: bool  # stopped by SIGTERM after checkpointing; run again to resume
    resumed_from: int | None
    world_size: int
    digest: str  # sha256 of this rank's final parameters
    device: str = "cpu"  # where this rank trained: cpu, cuda:<local rank>
    backend: str | None = None  # the process group's: gloo (CPU), nccl (GPU), None (one process)
    learner: MetaLearner | None = field(default=None, repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("learner")
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


# ---------------------------------------------------------------- signals


class _Stop:
    """SIGTERM sets a flag; the run checkpoints at the end of the step and returns."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ---------------------------------------------------------------- the run


def run(
    params: Params,
    *,
    curated: str | Path | None = None,
    meta_train: str | Path | None = None,
    meta_val: str | Path | None = None,
    output_dir: str | Path | None = None,
    resume: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Meta-train as this process's rank (world of one outside torchrun).

    Paths default to params: <curation.output_dir>/curated.parquet,
    <episodes.output_dir>/meta_train.jsonl and meta_val.jsonl, <meta.output_dir>.
    resume=False discards existing checkpoints (only on torchrun's first attempt, so elastic
    restarts still resume). `on_step(step, record)` is called after every step on every rank.
    """
    m = params.meta
    out = Path(output_dir or m.output_dir)
    torch.set_num_threads(m.threads_per_rank)
    keep_freed_memory()
    curated, meta_train, meta_val, train_eps, val_eps, texts = read_inputs(params, curated, meta_train, meta_val)
    fp = fingerprint(params, [curated, meta_train, meta_val])

    ctx = D.setup()
    try:
        with _Stop() as stop:
            return _train(params, ctx, out, texts, train_eps, val_eps, fp, resume, stop, on_step)
    finally:
        D.teardown(ctx)


def _train(params, ctx, out, texts, train_eps, val_eps, fp, resume, stop, on_step) -> TrainResult:
    m = params.meta
    main = ctx.is_main
    ckpts = Checkpoints(out / "checkpoints", keep=m.keep_checkpoints)
    if not val_eps and main:
        log.warning("no meta-val episodes: no validation, no early stopping; the last step is exported")

    torch.manual_seed(params.seed)
    model, tokenizer = load_backbone(params.backbone)
    learner = build_learner(model, LearnerConfig.from_params(m, params.backbone)).to(ctx.device)
    learner.train()
    meta_params = learner.meta_parameters()
    # fused: one kernel over all tensors; 14 ms a step on one CPU thread for MiniLM against 86 ms
    # for the foreach default (bench/meta_step.py's scaling row runs the same optimizer)
    optimizer = torch.optim.Adam(meta_params, lr=m.outer_lr, fused=True)

    # ---- resume or start fresh
    latest = ckpts.latest()
    if latest is not None and not (resume or ctx.restart_count > 0):
        latest = None
    if latest is not None and Checkpoints.state(latest).get("fingerprint") != fp:
        if main:
            log.warning("%s: checkpoints from a run with other params or data; starting fresh", ckpts.root)
        latest = None
    D.barrier(ctx)
    if latest is None and main:  # a fresh run: nothing of an earlier one may remain
        ckpts.wipe()
        for stale in ("metrics.jsonl", "summary.json"):
            (out / stale).unlink(missing_ok=True)
    state = {"step": 0, "position": 0, "best": None, "bad_validations": 0, "stopped_early": False}
    resumed_from = None
    if latest is not None:
        state.update(Checkpoints.load(latest, learner, optimizer))
        rngs = state.pop("rng") or []
        if len(rngs) == ctx.world:
            set_rng_state(rngs[ctx.rank])
        resumed_from = state["step"]
        if main:
            log.info("resuming from %s (step %d)", latest, resumed_from)
            ckpts.discard_after(resumed_from)
            _truncate_metrics(out / "metrics.jsonl", resumed_from)
    D.barrier(ctx)
    D.broadcast_module(learner, ctx)

    stream = EpisodeStream(train_eps, params.seed)
    make = lambda ep: episode_batch(ep, lambda ids: [texts[i] for i in ids], tokenizer, params.backbone.max_length,
                                    label_names=learner.needs_label_names,
                                    names_in_support=learner.names_in_support).to(ctx.device)
    amp = (lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16)) if m.bf16 else contextlib.nullcontext
    metrics = _Metrics(out / "metrics.jsonl", main)

    def validate(step: int) -> dict:
        learner.eval()
        sums = [0.0, 0.0, 0.0]
        for i in range(ctx.rank, len(val_eps), ctx.world):
            with amp():
                o = learner.evaluate(make(val_eps[i]))
            sums = [sums[0] + o.loss, sums[1] + o.acc, sums[2] + 1]
        learner.train()
        loss, acc, n = D.all_reduce_sum(sums, ctx)
        rec = {"val_loss": loss / n, "val_acc": acc / n}
        best = state["best"]
        if best is None or (rec["val_acc"], -rec["val_loss"]) > (best["val_acc"], -best["val_loss"]):
            state["best"], state["bad_validations"] = {"step": step, **rec}, 0
            if main:
                ckpts.save_best(step, learner, rec)
        else:
            state["bad_validations"] += 1
        return rec

    def checkpoint(step: int) -> None:
        rngs = D.all_gather_object(rng_state(), ctx)
        if main:
            ckpts.save(step, learner, optimizer, {**state, "fingerprint": fp, "world_size": ctx.world}, rngs)
        D.barrier(ctx)

    if state["step"] == 0 and val_eps and resumed_from is None:
        metrics.write({"step": 0, **validate(0)})

    B = m.meta_batch_size
    interrupted = False
    step = state["step"]
    finished = state["stopped_early"] or step >= m.steps
    while not finished:
        step += 1
        t0 = time.perf_counter()
        torch.manual_seed(D.step_seed(params.seed, step, ctx.rank))
        optimizer.zero_grad(set_to_none=True)
        sums = [0.0, 0.0, 0.0]
        for j in range(ctx.rank, B, ctx.world):
            with amp():
                o = learner.outer_backward(make(stream[state["position"] + j]), weight=1.0 / B)
            sums = [sums[0] + o.loss, sums[1] + o.acc, sums[2] + 1]
        D.sync_grads(meta_params, ctx, learner.row_sparse_parameters())
        if m.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(meta_params, m.max_grad_norm)
        optimizer.step()
        state["position"] += B
        state["step"] = step
        loss, acc, n, stopping = D.all_reduce_sum([*sums, float(stop.requested)], ctx)
        rec = {"step": step, "train_loss": loss / n, "train_acc": acc / n,
               "seconds": round(time.perf_counter() - t0, 4)}
        if val_eps and (step % m.val_every == 0 or step == m.steps):
            rec.update(validate(step))
            if state["bad_validations"] >= m.patience:
                state["stopped_early"] = True
        finished = state["stopped_early"] or step >= m.steps
        interrupted = stopping > 0 and not finished
        metrics.write(rec)
        if main:
            log.info("step %d/%d %s", step, m.steps, " ".join(f"{k}={v:.4g}" for k, v in rec.items() if k != "step"))
        if step % m.checkpoint_every == 0 or finished or interrupted:
            checkpoint(step)
        if on_step is not None:
            on_step(step, rec)
        if interrupted:
            if main:
                log.warning("SIGTERM: checkpointed step %d; run again to resume", step)
            break

    # ---- export
    model_dir = out / "model"
    best = state["best"]
    digests = D.all_gather_object(D.digest(learner), ctx)
    if main and not interrupted:
        exported = learner
        best_dir = ckpts.best(best["step"]) if best else None
        if best_dir is not None:
            exported = copy.deepcopy(learner)
            load_model(exported, str(best_dir / "weights.safetensors"), device=str(ctx.device))
        info = {"step": best["step"] if best_dir else step, "max_length": params.backbone.max_length,
                "backbone": params.backbone.name_or_path, "val_acc": best["val_acc"] if best else None}
        export_model(exported, tokenizer, model_dir, info)
    result = TrainResult(
        output_dir=out, model_dir=model_dir, step=step, best_step=best["step"] if best else None,
        best_val_loss=best["val_loss"] if best else None, best_val_acc=best["val_acc"] if best else None,
        stopped_early=state["stopped_early"], interrupted=interrupted, resumed_from=resumed_from,
        world_size=ctx.world, digest=digests[ctx.rank], device=str(ctx.device), backend=ctx.backend,
        learner=learner,
    )
    if main:
        if len(set(digests)) != 1:
            log.error("parameters differ across ranks: %s", digests)
        (out / "summary.json").write_text(
            json.dumps({**result.summary(), "rank_digests": digests}, indent=2) + "\n", encoding="utf-8")
    D.barrier(ctx)
    return result


class _Metrics:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    if path.is_file():
        keep = [l for l in path.read_text(encoding="utf-8").splitlines() if l and json.loads(l)["step"] <= step]
        path.write_text("".join(l + "\n" for l in keep), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m metaloop.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    ap.add_argument("--launch", action="store_true", help="start torchrun with params.meta's settings")
    ap.add_argument("--fresh", action="store_true", help="ignore and remove existing checkpoints")
    args = ap.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        if args.launch:
            preflight(params)
            return launch(args.params, *(["--fresh"] if args.fresh else []))
        result = run(params, resume=not args.fresh)
    except MetaloopError as err:
        print(f"error: {err}", file=sys.stderr)
        _end_the_job(err, rank)
        return 2
    return 143 if result.interrupted else 0


def _end_the_job(err: MetaloopError, rank: str) -> None:
    """Bad params or data fail the same way on every attempt, so under torchrun the rank
    records its message (for the launching task) and stops its agent: without that, torchrun
    would restart the job `--max-restarts` times first."""
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"type": type(err).__name__, "message": str(err), "rank": rank}) + "\n")
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:  # our parent is torchrun's agent
        os.kill(os.getppid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
