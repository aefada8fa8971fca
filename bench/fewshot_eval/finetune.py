"""Adapting on an episode's shots: the product's adaptation, a benchmark-only pooled-encoder
fine-tuner, and a meta-learner's own inner loop.

* `AdaptFitMethod` runs the product's per-domain adaptation (`metaloop.adapt.fit`, the
  architecture's own classification head) on the support rows: what `metaloop run` does.
* `Finetune` (benchmark-only, `--ft-impl pooled`) fine-tunes a copy of the pooled encoder plus
  a linear head initialised from the support prototypes (AdamW, warm-up/linear decay, fixed
  epochs, `FinetuneParams`); it holds the episodic and interpolation variants the experiment
  log measured. Nothing is selected on the queries.
* `MetaLearnerMethod` runs a meta-learner's `evaluate` (its own inner loop as trained).
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .methods import EmbeddingCache, FrozenCentroid
from metaloop.adapt import batches, linear_schedule, seeded
from metaloop.centroid_classifier import CentroidLayer
from metaloop.episodes import Episode
from metaloop.meta.data import episode_batch, tokenize
from metaloop.meta.encoder import Encoder, adapt_names
from metaloop.meta.head import Centroids, label_text, proto_head
from metaloop.meta.vocab import word_embedding_name

TextsOf = Callable[[Iterable[str]], list[str]]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FinetuneParams(_Strict):
    """Standard fine-tuning on an episode's support set (one copy of the encoder per episode)."""

    scope: Literal["all", "top_k", "head"] = Field("all", description="Encoder weights that train (the head always).")
    top_k: PositiveInt = 2
    epochs: PositiveInt = 10
    min_steps: Annotated[int, Field(ge=0)] = Field(10, description="At least this many optimizer steps.")
    batch_size: PositiveInt = 16
    lr: PositiveFloat = Field(5e-5, description="AdamW learning rate of encoder weights.")
    head_lr: PositiveFloat = Field(1e-3, description="AdamW learning rate of the linear head.")
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    warmup: Annotated[float, Field(ge=0, lt=1)] = 0.1
    dropout: bool = Field(True, description="Train mode (dropout on) while fine-tuning.")
    prototype_head: bool = Field(True, description="Initialise the head from the support prototypes (else random).")
    proto_scale: PositiveFloat = Field(
        1.0, description="Multiply the prototype head (its logits) by this; < 1 softens a head whose support loss "
                         "starts near 0 (with 1 shot each support row *is* its prototype) so gradients flow.")
    eval_batch_size: PositiveInt = 128
    interpolate: Annotated[float, Field(gt=0, le=1)] = Field(
        1.0, description="WiSE-FT (Wortsman et al. 2022): the weights used are (1 - a) * start + a * fine-tuned, "
                         "encoder and head; 1 keeps the fine-tuned weights. One model, no extra inference.")
    freeze_word_embeddings: bool = Field(
        False, description="Keep the input word embeddings fixed: a few shots move only the rows of the "
                           "tokens they contain, away from the rows of the tokens queries bring.")
    classifier: Literal["linear", "centroids", "episodic"] = Field(
        "linear", description="linear: a linear layer; centroids: the centroid classifier given to `Finetune` "
                              "(its metric, the class names as rows), its class vectors trained with the encoder; "
                              "episodic: no trained head: every epoch is one step of ProtoNet's loss on the support, "
                              "each row classified against prototypes made without it (leave one out), and the "
                              "episode is scored by the fine-tuned encoder's prototypes.")

    def steps_for(self, n_support: int) -> int:
        return max(self.min_steps, self.epochs * math.ceil(n_support / self.batch_size))


def _head_from_prototypes(z: torch.Tensor, y: torch.Tensor, ways: int, proto: bool, scale: float = 1.0) -> nn.Linear:
    head = nn.Linear(z.shape[-1], ways)
    if proto:
        init = proto_head(z, y, ways)
        with torch.no_grad():
            head.weight.copy_(scale * init["weight"])
            head.bias.copy_(scale * init["bias"])
    return head


def finetune_encoder(
    model: nn.Module, tokenizer, texts: Sequence[str], y: Sequence[int], ways: int, params: FinetuneParams,
    *, pooling: str = "mean", max_length: int = 64, seed: int = 13,
    labels: Sequence[str] | None = None, centroids: Centroids | None = None,
) -> tuple[Encoder, nn.Module, list[float]]:
    """Fine-tune a deep copy of `model` (an `AutoModel`) and a head on (texts, y).

    params.classifier=centroids trains a `CentroidLayer` with the rule `centroids` instead of a
    linear head; with `centroids.label_shots` > 0 the class names (`labels`) join the prototypes
    and the training rows, weighted by label_shots. Returns (encoder in eval mode, head,
    per-step losses); `model` itself is not touched.
    """
    rows, targets, weights = list(texts), list(y), [1.0] * len(texts)
    use_names = params.classifier == "centroids" and centroids is not None and centroids.uses_labels
    if params.classifier in ("centroids", "episodic") and centroids is None:
        raise ValueError(f"FinetuneParams.classifier={params.classifier} needs the `centroids` classifier")
    if params.classifier == "episodic":
        return _episodic_finetune(model, tokenizer, list(texts), list(y), ways, params, pooling, max_length, seed,
                                  labels, centroids)
    if use_names:
        if labels is None or len(labels) != ways:
            raise ValueError(f"centroids with label_shots > 0 need the {ways} class names (labels)")
        rows += [label_text(n) for n in labels]
        targets += list(range(ways))
        weights += [centroids.label_shots] * ways
    with seeded(seed):
        enc = _trainable_copy(model, pooling, params)
        y_t, w_t = torch.tensor(targets, dtype=torch.long), torch.tensor(weights)
        enc.eval()
        with torch.no_grad():
            z0 = torch.cat([enc(tokenize(tokenizer, [rows[i] for i in idx], max_length))
                            for idx in batches(len(rows), params.eval_batch_size)])
        n = len(texts)
        if params.classifier == "centroids":
            head = CentroidLayer.of(centroids.prototypes(z0[:n], y_t[:n], ways, z0[n:] if use_names else None),
                                   centroids)
        else:
            head = _head_from_prototypes(z0, y_t, ways, params.prototype_head, params.proto_scale)
        head_start = copy.deepcopy(head)
        groups = [g for g in (
            {"params": [p for p in enc.parameters() if p.requires_grad], "lr": params.lr},
            {"params": list(head.parameters()), "lr": params.head_lr},
        ) if g["params"]]
        opt = torch.optim.AdamW(groups, weight_decay=params.weight_decay)
        total = params.steps_for(len(rows))
        sched = linear_schedule(opt, total, params.warmup)
        rng = random.Random(f"finetune:{seed}")
        enc.train(params.dropout)
        losses: list[float] = []
        while len(losses) < total:
            for idx in batches(len(rows), params.batch_size, rng):
                if len(losses) >= total:
                    break
                logits = head(enc(tokenize(tokenizer, [rows[i] for i in idx], max_length)))
                loss = (F.cross_entropy(logits, y_t[idx], reduction="none") * w_t[idx]).sum() / w_t[idx].sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
        enc.eval()
        _interpolate(enc.model, model, params.interpolate)
        _interpolate(head, head_start, params.interpolate)
    return enc, head, losses


@torch.no_grad()
def _interpolate(tuned: nn.Module, start: nn.Module, a: float) -> None:
    """tuned <- (1 - a) * start + a * tuned, parameter by parameter (WiSE-FT)."""
    if a >= 1.0:
        return
    begin = dict(start.named_parameters())
    for name, p in tuned.named_parameters():
        p.lerp_(begin[name].to(p.dtype), 1.0 - a)


def leave_one_out_logits(centroids: Centroids, z: torch.Tensor, y: torch.Tensor, ways: int,
                         label_z: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of every support row against the prototypes, its own class's made without it."""
    zp = centroids._prep(z)
    lp = None if label_z is None else centroids._prep(label_z)
    extra = centroids.label_shots if lp is not None else 0.0
    onehot = F.one_hot(y, ways).to(zp.dtype)
    sums, counts = onehot.t() @ zp, onehot.sum(0) + extra
    if lp is not None:
        sums = sums + extra * lp
    if bool((counts[y] - 1 <= 0).any()):
        raise ValueError("leave-one-out prototypes need 2 shots a class or the class names (label_shots > 0)")
    logits = centroids.logits(z, sums / counts.unsqueeze(1))
    own = (sums[y] - zp) / (counts[y] - 1).unsqueeze(1)
    if centroids.metric == "cosine":
        own_logit = centroids.scale * (F.normalize(z, dim=-1) * F.normalize(own, dim=-1)).sum(-1)
    else:
        own_logit = -((z - own) ** 2).sum(-1)
    return logits.scatter(1, y.unsqueeze(1), own_logit.unsqueeze(1))


def _trainable_copy(model: nn.Module, pooling: str, params: FinetuneParams) -> Encoder:
    """A deep copy of `model` whose weights train as `params` says (scope, frozen word embeddings)."""
    enc = Encoder(copy.deepcopy(model), pooling)
    trainable = set(adapt_names(enc, params.scope, params.top_k))
    if params.freeze_word_embeddings:
        trainable.discard(word_embedding_name(enc.model))
    for name, p in enc.named_weights().items():
        p.requires_grad_(name in trainable)
    return enc


def _episodic_finetune(model, tokenizer, texts, y, ways, params, pooling, max_length, seed, labels, centroids):
    if centroids.uses_labels and (labels is None or len(labels) != ways):
        raise ValueError(f"centroids with label_shots > 0 need the {ways} class names (labels)")
    names = [label_text(n) for n in labels] if centroids.uses_labels else []
    with seeded(seed):
        enc = _trainable_copy(model, pooling, params)
        y_t, n = torch.tensor(y, dtype=torch.long), len(texts)
        opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=params.lr,
                                weight_decay=params.weight_decay)
        sched = linear_schedule(opt, params.epochs, params.warmup)
        batch = tokenize(tokenizer, texts + names, max_length)
        enc.train(params.dropout)
        losses: list[float] = []
        for _ in range(params.epochs):  # one step an epoch: every row is a query once
            z = enc(batch)
            logits = leave_one_out_logits(centroids, z[:n], y_t, ways, z[n:] if names else None)
            loss = F.cross_entropy(logits, y_t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        enc.eval()
        _interpolate(enc.model, model, params.interpolate)
        with torch.no_grad():
            z = enc(batch)
            head = CentroidLayer.of(centroids.prototypes(z[:n], y_t, ways, z[n:] if names else None), centroids)
    return enc, head, losses


@torch.no_grad()
def predict(encoder: Encoder, head: nn.Module, tokenizer, texts: Sequence[str], max_length: int = 64,
            batch_size: int = 128) -> torch.Tensor:
    """Class indices predicted for `texts` (encoder in eval mode)."""
    was = encoder.training
    encoder.eval()
    try:
        out = [head(encoder(tokenize(tokenizer, [texts[i] for i in idx], max_length))).argmax(-1)
               for idx in batches(len(texts), batch_size)]
    finally:
        encoder.train(was)
    return torch.cat(out)


class Finetune:
    """Fine-tune a fresh copy of `model` on each episode's support set, score its queries."""

    def __init__(self, model: nn.Module, tokenizer, params: FinetuneParams, *, pooling: str = "mean",
                 max_length: int = 64, seed: int = 13, centroids: Centroids | None = None):
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.pooling, self.max_length, self.seed = pooling, max_length, seed
        self.centroids = centroids

    def accuracy(self, episode: Episode, texts_of: TextsOf) -> float:
        enc, head, _ = finetune_encoder(
            self.model, self.tokenizer, texts_of(episode.support_ids), episode.support_y, episode.ways,
            self.params, pooling=self.pooling, max_length=self.max_length, seed=self.seed,
            labels=list(episode.labels), centroids=self.centroids,
        )
        pred = predict(enc, head, self.tokenizer, texts_of(episode.query_ids), self.max_length,
                       self.params.eval_batch_size)
        return float((pred == torch.tensor(episode.query_y)).float().mean())


class AdaptFitMethod:
    """The production adaptation (`metaloop.adapt.fit`, the architecture's own classifier head)."""

    def __init__(self, init: str | Path, params, *, max_length: int = 64, seed: int = 13,
                 centroids: Centroids | None = None, pooling: str = "mean"):
        self.init, self.params, self.max_length, self.seed = init, params, max_length, seed
        self.centroids, self.pooling = centroids, pooling

    def accuracy(self, episode: Episode, texts_of: TextsOf) -> float:
        from metaloop.adapt import Examples, fit, predict_logits

        labels = list(episode.labels)
        support = Examples(texts_of(episode.support_ids), [labels[y] for y in episode.support_y])
        model, tok, _ = fit(self.init, support, labels, self.params, max_length=self.max_length, seed=self.seed,
                            centroids=self.centroids, pooling=self.pooling)
        logits = predict_logits(model, tok, texts_of(episode.query_ids), self.max_length)
        return float((logits.argmax(-1) == torch.tensor(episode.query_y)).float().mean())


class MetaLearnerMethod:
    """A meta-learner's own adaptation (`learner.evaluate`: its inner loop, as trained)."""

    def __init__(self, learner: nn.Module, tokenizer, *, max_length: int = 64):
        self.learner, self.tokenizer, self.max_length = learner, tokenizer, max_length
        # ProtoNet: no inner loop; the same math with cached embeddings
        self.centroid = (FrozenCentroid(EmbeddingCache(learner.encoder, tokenizer, max_length), learner.cfg.centroids)
                         if getattr(learner, "name", "") == "protonet" else None)

    def accuracy(self, episode: Episode, texts_of: TextsOf) -> float:
        if self.centroid is not None:
            return self.centroid.accuracy(episode, texts_of)
        self.learner.eval()
        batch = episode_batch(episode, texts_of, self.tokenizer, self.max_length,
                              label_names=self.learner.needs_label_names,
                              names_in_support=self.learner.names_in_support)
        return float(self.learner.evaluate(batch).acc)
