"""The fitting loop: AdamW (plus SGD on learned rates), warm-up then linear decay, early
stopping on held-out rows, and soups (the mean of several seeds' weights).

    model, tokenizer, history = fit(init, data.train, labels, params, val=data.val)
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from metaloop.errors import ConfigError
from metaloop.stage_params import AdaptParams
from metaloop.adapt.data import Examples
from metaloop.adapt.features import accuracy, batches, encode, final_linear, prototype_init
from metaloop.adapt.folder import load_for_classification, read_learned_lrs, resolve_init
from metaloop.adapt.torch_state import seeded
from metaloop.adapt.trainable import add_lora, learned_lr_map, set_trainable

log = logging.getLogger("metaloop.adapt")


def linear_schedule(optimizer, total: int, warmup: float):
    warm = max(1, int(total * warmup)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class FitHistory:
    strategy: str
    epochs_run: int = 0
    best_epoch: int = 0
    steps: int = 0
    train_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    stopped_early: bool = False
    learned_lrs: int = 0  # parameters trained with Meta-SGD step sizes
    trainable_params: int = 0
    seconds: float = 0.0
    soup: int = 1  # members averaged into the returned model
    soup_val_accuracy: float | None = None  # the average's held-out accuracy (soup > 1)


def fit(
    init: str | Path,
    train: Examples,
    labels: Sequence[str],
    params: AdaptParams,
    *,
    val: Examples | None = None,
    max_length: int = 64,
    seed: int = 13,
    centroids=None,
    pooling: str = "mean",
):
    """Train a classifier in memory; returns (model, tokenizer, FitHistory). Nothing is saved.

    The model returned is a plain `PreTrainedModel` (LoRA already merged), or with
    `params.classifier` = centroids a `CentroidClassifier` whose rule is `centroids`
    (`params.meta.centroids()`: the classifier the encoder was meta-trained with) and whose
    class names join the training rows, weighted by its label_shots; in eval mode.

    `params.soup` > 1 fine-tunes that many members, seeds `seed`, `seed + 1`, ..., from the
    same init and returns one model holding the mean of their weights (a uniform model
    soup: fine-tunings of one init stay in one basin, so their average is a model, not a
    blur). The history is the first member's, with `soup` and the total seconds.
    """
    kw = {"val": val, "max_length": max_length, "centroids": centroids, "pooling": pooling}
    model, tokenizer, hist = _fit_one(init, train, labels, params, seed=seed, **kw)
    if params.soup == 1:
        return model, tokenizer, hist
    states = [model.state_dict()]
    for i in range(1, params.soup):
        member, _, h = _fit_one(init, train, labels, params, seed=seed + i, **kw)
        states.append(member.state_dict())
        hist.seconds += h.seconds
    model.load_state_dict(mean_weights(states))
    hist.soup = params.soup
    if val is not None and len(val):  # the returned model's own held-out accuracy, not member 0's
        hist.soup_val_accuracy = accuracy(model, tokenizer, val, labels, max_length)[0]
    return model, tokenizer, hist


def mean_weights(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of state dicts with the same keys (a model soup, averaged
    checkpoints): floating tensors averaged in float64 and cast back, others (integer
    buffers such as position ids) taken from the first."""
    if not states:
        raise ValueError("mean_weights needs at least one state dict")
    return {k: (sum(s[k].double() for s in states) / len(states)).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()}


def _fit_one(
    init: str | Path,
    train: Examples,
    labels: Sequence[str],
    params: AdaptParams,
    *,
    val: Examples | None,
    max_length: int,
    seed: int,
    centroids,
    pooling: str,
):
    """One fine-tuning run (see `fit`)."""
    labels = list(labels)
    if params.classifier == "centroids" and centroids is None:
        raise ConfigError("adapt.classifier: centroids needs the centroid rule: pass centroids=params.meta.centroids()")
    rule = centroids if params.classifier == "centroids" else None
    t0 = time.perf_counter()
    with seeded(seed, params.threads):
        model, tokenizer = load_for_classification(init, labels, centroids=rule, pooling=pooling)
        if rule is not None and rule.uses_labels:  # the names are training rows too, as in the prototypes
            from metaloop.meta.head import label_text

            names = [label_text(n) for n in labels]
            rows = Examples([*train.texts, *names], [*train.labels, *labels])
            row_weights = torch.tensor([1.0] * len(train) + [rule.label_shots] * len(names))
        else:
            rows, row_weights = train, None
        if params.prototype_head:
            prototype_init(model, tokenizer, train, labels, max_length)
        learned = read_learned_lrs(resolve_init(init)) if params.learned_lrs else None
        head_name = next(n for n, m in model.named_modules() if m is final_linear(model))
        prefix = model.base_model_prefix
        if params.strategy == "lora":
            model = add_lora(model, params, init)
        else:
            set_trainable(model, params)
        sgd = learned_lr_map(model, learned, params.learned_lr_scale, head_name, prefix) if learned else {}
        hist = FitHistory(params.strategy, learned_lrs=len(sgd))
        head_ids = {id(p) for n, p in model.named_parameters()
                    if p.requires_grad and any(h in n for h in ("classifier", "pooler", "centroids"))}
        groups = {"head": [], "enc": []}
        for n, p in model.named_parameters():
            if p.requires_grad and p not in sgd:
                groups["head" if id(p) in head_ids else "enc"].append(p)
        hist.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        enc_lr = params.lora_lr if params.strategy == "lora" else params.lr
        opt_groups = [g for g in (
            {"params": groups["enc"], "lr": enc_lr},
            {"params": groups["head"], "lr": params.head_lr},
        ) if g["params"]]
        optimizer = torch.optim.AdamW(opt_groups, weight_decay=params.weight_decay) if opt_groups else None
        steps_per_epoch = math.ceil(len(rows) / params.batch_size)
        total = steps_per_epoch * params.epochs
        scheduler = linear_schedule(optimizer, total, params.warmup) if optimizer else None
        y_all = torch.tensor([labels.index(lab) for lab in rows.labels])
        rng = random.Random(f"adapt-batches:{seed}")
        best: tuple[float, float] | None = None
        best_state = None
        bad = 0
        for epoch in range(1, params.epochs + 1):
            model.train()
            losses = []
            for idx in batches(len(rows), params.batch_size, rng):
                inputs = encode(tokenizer, [rows.texts[i] for i in idx], max_length)
                logits = model(**inputs).logits
                if row_weights is None:
                    loss = F.cross_entropy(logits, y_all[idx])
                else:
                    w = row_weights[idx]
                    loss = (F.cross_entropy(logits, y_all[idx], reduction="none") * w).sum() / w.sum()
                loss.backward()
                if optimizer:
                    optimizer.step()
                    scheduler.step()
                with torch.no_grad():
                    for p, lr in sgd.items():
                        if p.grad is not None:
                            p.sub_(lr * p.grad)
                model.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                hist.steps += 1
            hist.train_loss.append(sum(losses) / len(losses))
            hist.epochs_run = epoch
            if val is not None and len(val):
                acc, vloss = accuracy(model, tokenizer, val, labels, max_length)
                hist.val_accuracy.append(acc)
                hist.val_loss.append(vloss)
                log.info("adapt: epoch %d train loss %.4f, held-out acc %.4f loss %.4f",
                         epoch, hist.train_loss[-1], acc, vloss)
                if best is None or (acc, -vloss) > best:
                    best, bad, hist.best_epoch = (acc, -vloss), 0, epoch
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    bad += 1
                    if bad >= params.patience:
                        hist.stopped_early = True
                        break
            else:
                hist.best_epoch = epoch
        if best_state is not None:
            model.load_state_dict(best_state)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
    model.eval()
    hist.seconds = time.perf_counter() - t0
    return model, tokenizer, hist
