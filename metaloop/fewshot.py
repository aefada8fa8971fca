"""Few-shot evaluation of an initialisation on fixed evaluation episodes.

The pieces `bench/fewshot.py` is built from, usable on their own:

    cache = EmbeddingCache(encoder, tokenizer, max_length=64)
    centroids = params.meta.centroids()                  # ProtoNet's classifier (metric, names)
    method = FrozenCentroid(cache, centroids)            # no training at all
    method = CentroidHeadFit(cache, centroids, steps=50) # the prototypes fitted as a head
    method = Finetune(model, tokenizer, FinetuneParams(), pooling="mean")
    method = MetaLearnerMethod(learner, tokenizer)        # a meta-learner's own adaptation
    scores = score_episodes("finetune", method, episodes, pool.texts)
    summary = summarise(scores)                           # {shots: Summary(mean, ci95, n, sd)}

Every method sees an episode (support rows with class indices, query rows) and returns the
fraction of its queries classified correctly. All of them work on the same sentence
embedding the meta-learners train: the backbone's hidden states pooled by
`metaloop.meta.pooling` (mean by default), with the prototype-initialised linear head of
`metaloop.meta.head` (W_k = 2 c_k, b_k = -||c_k||^2). So:

* `FrozenCentroid` is the ProtoNet classifier of the frozen encoder: a
  `metaloop.meta.head.Centroids` (squared Euclidean or cosine distance to the class means of
  the support embeddings, the class names optionally counted as support rows).
  It equals `ProtoNet.evaluate` on the same encoder (tested); embeddings are cached by row
  id, so the query set shared by every draw of a domain is encoded once.
* `Finetune` is standard fine-tuning on the K shots: a copy of the encoder plus a linear head
  (initialised from the support prototypes, i.e. starting as the centroid classifier),
  AdamW with a warm-up/linear-decay schedule, cross-entropy, a fixed number of epochs
  (`FinetuneParams`); nothing is selected on the queries.
* `AdaptFitMethod` runs the production per-domain adaptation (`metaloop.adapt.fit`, the
  architecture's own classification head) on the support rows, for comparison.
* `MetaLearnerMethod` runs a meta-learner's `evaluate` (its own inner loop as trained);
  for ProtoNet, whose encoder does not change at test time, the cached centroid path
  (identical math) is used.

`supervised_pretrain` is the non-episodic baseline: the encoder plus one linear head over
every intent of the meta-train domains, cross-entropy on mini-batches, optionally
validated every `val_every` steps by a callback (e.g. the centroid accuracy on meta-val
episodes) with the best weights kept.

`mean_ci95` gives the mean and the half-width of the 95% confidence interval of the mean
(Student t with n-1 degrees of freedom, computed here without scipy).
"""

from __future__ import annotations

import copy
import functools
import math
import random
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Protocol

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

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


# ---------------------------------------------------------------- statistics


def _t_pdf(x: float, df: int) -> float:
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(logc - (df + 1) / 2 * math.log1p(x * x / df))


def _t_cdf(x: float, df: int, intervals: int = 2000) -> float:
    """P(T <= x) for x >= 0 by Simpson's rule on [0, x] (the density is smooth there)."""
    if x <= 0:
        return 0.5
    h = x / intervals
    s = _t_pdf(0.0, df) + _t_pdf(x, df)
    s += 4 * sum(_t_pdf((2 * i - 1) * h, df) for i in range(1, intervals // 2 + 1))
    s += 2 * sum(_t_pdf(2 * i * h, df) for i in range(1, intervals // 2))
    return 0.5 + s * h / 3


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The p-quantile (0.5 <= p < 1) of Student's t with `df` degrees of freedom."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError("t_quantile needs 0.5 <= p < 1 and df >= 1")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Summary:
    mean: float
    ci95: float  # half-width of the 95% confidence interval of the mean (0 for n = 1)
    n: int
    sd: float  # sample standard deviation (n - 1)


def mean_ci95(values: Sequence[float]) -> Summary:
    """Mean and 95% CI half-width t(0.975, n-1) * sd / sqrt(n) of independent measurements."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci95 of no values")
    mean = statistics.fmean(values)
    if n == 1:
        return Summary(mean, 0.0, 1, 0.0)
    sd = statistics.stdev(values)
    return Summary(mean, t_quantile(0.975, n - 1) * sd / math.sqrt(n), n, sd)


# ---------------------------------------------------------------- episodes


def shots_of(episode: Episode) -> int:
    return len(episode.support_ids) // max(1, episode.ways)


@dataclass(frozen=True)
class EpisodeScore:
    method: str
    episode: str
    domain: str
    shots: int
    accuracy: float  # percent of the episode's queries
    seconds: float  # adaptation + scoring of this episode


class Method(Protocol):
    def accuracy(self, episode: Episode, texts_of: TextsOf) -> float:
        """Fraction of `episode`'s queries classified correctly after adapting on its support."""
        ...


def score_episodes(name: str, method: Method, episodes: Sequence[Episode], texts_of: TextsOf,
                   on_episode: Callable[[EpisodeScore], None] | None = None) -> list[EpisodeScore]:
    """Run `method` on every episode, in order; one `EpisodeScore` each."""
    out = []
    for ep in episodes:
        if not ep.query_ids:
            raise ValueError(f"episode {ep.id}: no queries to score")
        t0 = time.perf_counter()
        acc = method.accuracy(ep, texts_of)
        score = EpisodeScore(name, ep.id, ep.domain, shots_of(ep), 100.0 * acc, time.perf_counter() - t0)
        out.append(score)
        if on_episode is not None:
            on_episode(score)
    return out


def summarise(scores: Sequence[EpisodeScore]) -> dict[int, Summary]:
    """{shots: mean and 95% CI over the episodes with that many shots}."""
    by: dict[int, list[float]] = {}
    for s in scores:
        by.setdefault(s.shots, []).append(s.accuracy)
    return {k: mean_ci95(v) for k, v in sorted(by.items())}


# ---------------------------------------------------------------- frozen encoder


class EmbeddingCache:
    """Pooled embeddings of an encoder that does not change, computed once per row id."""

    def __init__(self, encoder: Encoder, tokenizer, max_length: int = 64, batch_size: int = 64):
        self.encoder, self.tokenizer = encoder, tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self._z: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, ids: Sequence[str], texts_of: TextsOf) -> torch.Tensor:
        todo = sorted({i for i in ids if i not in self._z})
        if todo:
            texts = texts_of(todo)
            was = self.encoder.training
            self.encoder.eval()
            try:
                # similar lengths together: less padding
                order = sorted(range(len(todo)), key=lambda j: len(texts[j]))
                for start in range(0, len(order), self.batch_size):
                    idx = order[start : start + self.batch_size]
                    z = self.encoder(tokenize(self.tokenizer, [texts[j] for j in idx], self.max_length))
                    for j, row in zip(idx, z):
                        self._z[todo[j]] = row.clone()
            finally:
                self.encoder.train(was)
        return torch.stack([self._z[i] for i in ids])

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings of literal texts (e.g. class names), cached under the text itself."""
        keys = [f"text:{t}" for t in texts]
        by_key = dict(zip(keys, texts))
        return self.embed(keys, lambda ks: [by_key[k] for k in ks])

    def __len__(self) -> int:
        return len(self._z)


class FrozenCentroid:
    """No training: the class means of the support embeddings classify the queries.

    `centroids` says how (metric; with `label_shots` > 0 the class names' embeddings join the
    support rows).
    """

    def __init__(self, cache: EmbeddingCache, centroids: Centroids = Centroids()):
        self.cache, self.centroids = cache, centroids

    def weights(self, zs: torch.Tensor, ys: torch.Tensor, ways: int, label_z: torch.Tensor | None) -> torch.Tensor:
        """The classifier's class vectors: here the prototypes themselves."""
        return self.centroids.prototypes(zs, ys, ways, label_z)

    def accuracy(self, episode: Episode, texts_of: TextsOf) -> float:
        c = self.centroids
        zs = self.cache.embed(episode.support_ids, texts_of)
        zq = self.cache.embed(episode.query_ids, texts_of)
        label_z = self.cache.embed_texts([label_text(n) for n in episode.labels]) if c.uses_labels else None
        w = self.weights(zs, torch.tensor(episode.support_y), episode.ways, label_z)
        return float((c.logits(zq, w).argmax(-1) == torch.tensor(episode.query_y)).float().mean())


class CentroidHeadFit(FrozenCentroid):
    """The centroid classifier, then `steps` Adam steps on the prototypes alone, encoder frozen.

    The prototypes (class names included, as `centroids` says) become the weights of a head
    with the same metric (Baseline++'s cosine classifier when metric is cosine), trained by
    cross-entropy on the support embeddings and the class-name embeddings (weighted by
    `label_shots`). Embeddings are cached, so a fit costs milliseconds: the encoder is never
    run backwards. Episodes with fewer than `min_shots` rows per class keep the prototypes
    (at 1 shot the support rows and names already are the prototypes; fitting them did not
    help on the source domains, docs/fewshot.md). steps=0 is exactly `FrozenCentroid`.
    """

    def __init__(self, cache: EmbeddingCache, centroids: Centroids, steps: int = 50, lr: float = 1e-3,
                 min_shots: int = 2):
        super().__init__(cache, centroids)
        self.steps, self.lr, self.min_shots = steps, lr, min_shots

    def weights(self, zs: torch.Tensor, ys: torch.Tensor, ways: int, label_z: torch.Tensor | None) -> torch.Tensor:
        protos = super().weights(zs, ys, ways, label_z)
        if len(ys) < self.min_shots * ways:
            return protos
        return self.fit(protos, zs, ys, ways, label_z)

    def fit(self, protos: torch.Tensor, zs: torch.Tensor, ys: torch.Tensor, ways: int,
            label_z: torch.Tensor | None) -> torch.Tensor:
        c = self.centroids
        weights = protos.detach().clone().requires_grad_(True)
        rows, targets, w = zs, ys, torch.ones(len(ys))
        if label_z is not None:  # the class names are training rows too, weighted as in the prototypes
            rows = torch.cat([zs, label_z])
            targets = torch.cat([ys, torch.arange(ways)])
            w = torch.cat([w, torch.full((ways,), c.label_shots)])
        opt = torch.optim.Adam([weights], lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                loss = (F.cross_entropy(c.logits(rows, weights), targets, reduction="none") * w).sum() / w.sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        return weights.detach()


# ---------------------------------------------------------------- fine-tuning on the shots


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


# ---------------------------------------------------------------- supervised pretraining


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


__all__ = [
    "AdaptFitMethod",
    "CentroidHeadFit",
    "EmbeddingCache",
    "EpisodeScore",
    "Finetune",
    "FinetuneParams",
    "FrozenCentroid",
    "MetaLearnerMethod",
    "Method",
    "PretrainParams",
    "PretrainResult",
    "Summary",
    "finetune_encoder",
    "mean_ci95",
    "predict",
    "score_episodes",
    "shots_of",
    "summarise",
    "supervised_pretrain",
    "t_quantile",
]
