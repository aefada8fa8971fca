"""The non-episodic baseline: the encoder plus one linear head over every meta-train intent,
cross-entropy on mini-batches, optionally validated every `val_every` steps by a callback
(e.g. the centroid accuracy on meta-val episodes) with the best weights kept."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .finetune import _Strict
from metaloop.adapt import batches, linear_schedule, seeded
from metaloop.meta.data import tokenize
from metaloop.meta.encoder import Encoder

TextsOf = Callable[[Iterable[str]], list[str]]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class PretrainParams(_Strict):
    """Non-episodic supervised training: every meta-train intent as one classification task."""

    epochs: PositiveInt = 2
    max_steps: PositiveInt | None = Field(None, description="Stop after this many optimizer steps.")
    minutes: PositiveFloat | None = Field(None, description="Stop after this much wall time.")
    batch_size: PositiveInt = 32
    lr: PositiveFloat = 3e-5
    head_lr: PositiveFloat = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    warmup: Annotated[float, Field(ge=0, lt=1)] = 0.06
    val_every: PositiveInt = Field(100, description="Validate (callback) every this many steps.")
    patience: PositiveInt = Field(4, description="Validations without improvement before stopping.")


@dataclass
class PretrainResult:
    steps: int
    best_step: int | None
    best_val: float | None
    history: list[dict] = field(default_factory=list)
    stopped: str = "epochs"  # epochs | max_steps | minutes | patience
    seconds: float = 0.0


def supervised_pretrain(
    model: nn.Module, tokenizer, texts: Sequence[str], labels: Sequence[str], params: PretrainParams,
    *, validate: Callable[[Encoder], float] | None = None, pooling: str = "mean", max_length: int = 64,
    seed: int = 13, log: Callable[[str], None] | None = None,
) -> PretrainResult:
    """Train `model` (in place) with a linear head over every label of `labels`.

    `validate(encoder)` (higher is better) runs at step 0, every `val_every` steps and at the
    end; the best step's encoder weights are loaded back into `model` before returning.
    """
    t0 = time.perf_counter()
    names = sorted(set(labels))
    y = torch.tensor([names.index(lab) for lab in labels], dtype=torch.long)
    res = PretrainResult(0, None, None)
    with seeded(seed):
        enc = Encoder(model, pooling)
        for p in enc.parameters():
            p.requires_grad_(True)
        head = nn.Linear(model.config.hidden_size, len(names))
        opt = torch.optim.AdamW([{"params": list(enc.parameters()), "lr": params.lr},
                                 {"params": list(head.parameters()), "lr": params.head_lr}],
                                weight_decay=params.weight_decay)
        per_epoch = math.ceil(len(texts) / params.batch_size)
        total = per_epoch * params.epochs
        if params.max_steps:
            total = min(total, params.max_steps)
        sched = linear_schedule(opt, total, params.warmup)
        rng = random.Random(f"pretrain:{seed}")
        best_state: dict[str, torch.Tensor] | None = None
        bad = 0

        def check(step: int) -> bool:
            """Validate; True when patience ran out."""
            nonlocal best_state, bad
            if validate is None:
                return False
            enc.eval()
            v = float(validate(enc))
            enc.train()
            res.history.append({"step": step, "val": v, "seconds": round(time.perf_counter() - t0, 2)})
            if log:
                log(f"supervised-pretrain step {step}/{total}: validation {v:.4f}")
            if res.best_val is None or v > res.best_val:
                res.best_val, res.best_step, bad = v, step, 0
                best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
                return False
            bad += 1
            return bad >= params.patience

        deadline = t0 + 60 * params.minutes if params.minutes else None
        check(0)
        enc.train()
        step, done = 0, False
        while not done:
            for idx in batches(len(texts), params.batch_size, rng):
                logits = head(enc(tokenize(tokenizer, [texts[i] for i in idx], max_length)))
                loss = F.cross_entropy(logits, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if step % params.val_every == 0 and check(step):
                    res.stopped, done = "patience", True
                elif step >= total:
                    res.stopped, done = ("max_steps" if params.max_steps and step >= params.max_steps
                                         else "epochs"), True
                elif deadline is not None and time.perf_counter() > deadline:
                    res.stopped, done = "minutes", True
                if done:
                    break
        if validate is not None and (not res.history or res.history[-1]["step"] != step):
            check(step)
        res.steps = step
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
    res.seconds = time.perf_counter() - t0
    return res
