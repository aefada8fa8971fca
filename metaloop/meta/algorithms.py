"""Six meta-learning algorithms behind one interface.

Every learner is an `nn.Module` holding the encoder (and, for Meta-SGD, the learned inner
learning rates) as ordinary parameters, and offers:

    outcome = learner.outer_backward(batch, weight)  # accumulate weight * meta-gradient in .grad
    outcome = learner.evaluate(batch)                # adapt, then score the query set (no meta-graph)
    adapted = learner.adapt(batch)                   # fast weights for one episode

| algorithm | inner loop                              | meta-gradient                                  |
|-----------|-----------------------------------------|------------------------------------------------|
| maml      | `inner_steps` SGD steps on the support  | through the inner loop (second order)          |
| fomaml    | same                                    | query gradient at the adapted weights          |
| metasgd   | same, per-parameter learned step sizes  | as maml (or fomaml with first_order), LRs too  |
| anil      | same, head only (features computed once)| as maml, through the head-only inner loop      |
| reptile   | same, detached                          | theta - adapted weights                        |
| protonet  | none                                    | query loss of the prototype classifier         |

`meta.first_order: true` turns maml into fomaml and makes metasgd/anil first order.
`meta.adapt` picks the adapted encoder parameters (see `encoder.adapt_names`); ANIL always
adapts the head only; ProtoNet has no inner loop and ignores it. The head of every
algorithm is the prototype-initialised linear head (see `metaloop.meta.head`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metaloop.errors import ConfigError
from metaloop.meta.data import EpisodeBatch, Inputs
from metaloop.meta.encoder import Encoder, adapt_names, add_lora
from metaloop.meta.head import Centroids, head_logits
from metaloop.meta.inner import HEAD_KEYS, Adapted, inner_loop, inner_loop_replayed, query_logits
from metaloop.meta.vocab import EpisodeVocab, word_embedding_name


@dataclass(frozen=True)
class LearnerConfig:
    algorithm: str = "maml"
    adapt: str = "all"
    top_k: int = 2
    inner_steps: int = 5
    inner_lr: float = 0.01
    first_order: bool = False
    pooling: str = "mean"
    lora_rank: int = 8
    lora_targets: tuple[str, ...] | None = None
    checkpointing: bool = False  # activation checkpointing, layer by layer
    centroids: Centroids = Centroids()  # ProtoNet's classifier (metric, scale, label_shots)
    query_chunk: int = 0  # > 0: the outer loss runs this many queries at a time (memory; same gradient)
    length_groups: int = 1  # > 1: each set runs as this many length groups (less padding; same result)
    slice_vocab: bool = True  # adapt only the word-embedding rows an episode uses (same gradient)

    @classmethod
    def from_params(cls, meta, backbone) -> LearnerConfig:
        targets = meta.lora_targets
        return cls(
            algorithm=meta.algorithm, adapt=meta.adapt, top_k=meta.top_k, inner_steps=meta.inner_steps,
            inner_lr=meta.inner_lr, first_order=meta.first_order, pooling=backbone.pooling,
            lora_rank=meta.lora_rank, lora_targets=tuple(targets) if targets else None,
            checkpointing=meta.activation_checkpointing,
            centroids=meta.centroids(), query_chunk=meta.query_chunk, length_groups=meta.length_groups,
        )


@dataclass
class Outcome:
    loss: torch.Tensor | float  # query loss after adaptation
    acc: float


def _score(logits: torch.Tensor, y: torch.Tensor) -> Outcome:
    return Outcome(F.cross_entropy(logits, y), float((logits.argmax(-1) == y).float().mean()))


class MetaLearner(nn.Module):
    """Base: MAML-style learners (maml, fomaml, metasgd, anil) share all of this."""

    name = "maml"
    scope_override: str | None = None

    def __init__(self, encoder: Encoder, cfg: LearnerConfig):
        super().__init__()
        self.encoder = encoder
        self.cfg = cfg
        self.scope = self.scope_override or cfg.adapt
        self.adapt_names = adapt_names(encoder, self.scope, cfg.top_k)
        # Memory saving: second-order inner loops replay whole steps in the backward pass
        # (their graphs are what fills memory); other learners recompute layer activations.
        self.checkpoint_steps = cfg.checkpointing and self.second_order and bool(self.adapt_names)
        encoder.checkpointing = cfg.checkpointing and not self.checkpoint_steps
        emb = word_embedding_name(encoder.model) if cfg.slice_vocab else None
        self.vocab_name = emb if emb in self.adapt_names else None

    # ---- pieces
    @property
    def needs_label_names(self) -> bool:
        """Whether episode batches must carry the class names (`episode_batch(label_names=True)`)."""
        return False

    @property
    def names_in_support(self) -> int:
        """How many times each class name joins the support set (`episode_batch(names_in_support=)`):
        round(label_shots), at least once when label_shots > 0. The head starts at the support
        prototypes, names included, and the inner loop trains on them as rows."""
        shots = self.cfg.centroids.label_shots
        return max(1, round(shots)) if shots > 0 else 0

    @property
    def second_order(self) -> bool:
        return not self.cfg.first_order

    def inner_lr(self, key: str) -> float | torch.Tensor:
        return self.cfg.inner_lr

    def meta_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def row_sparse_parameters(self) -> list[nn.Parameter]:
        """Meta-parameters whose gradient touches only an episode's rows (for `dist.sync_grads`)."""
        return [self.encoder.named_weights()[self.vocab_name]] if self.vocab_name else []

    def episode_vocab(self, batch: EpisodeBatch) -> EpisodeVocab | None:
        """The word-embedding rows this episode uses, when the inner loop adapts that matrix."""
        return EpisodeVocab.of(self.vocab_name, batch.support, batch.query) if self.vocab_name else None

    def _adapt(self, batch: EpisodeBatch, vocab: EpisodeVocab | None, *, create_graph: bool,
               detach_meta: bool, steps: int | None = None, replayed: bool = False) -> Adapted:
        """The inner loop; with `vocab`, on the sliced word embeddings (inputs renumbered).
        replayed=True: second order, one step's graph at a time (`inner_loop_replayed`)."""
        support, lr, start = batch.support, self.inner_lr, None
        if vocab is not None:
            support, lr = vocab.remap(support), vocab.lr(lr)
            start = {vocab.name: vocab.slice(self.encoder.named_weights()[vocab.name])}
        args = (self.encoder, support, batch.support_y, batch.ways, self.adapt_names)
        steps = self.cfg.inner_steps if steps is None else steps
        if replayed:
            return inner_loop_replayed(*args, steps=steps, lr=lr, start=start)
        return inner_loop(*args, steps=steps, lr=lr, create_graph=create_graph, detach_meta=detach_meta,
                          start=start)

    def adapt(self, batch: EpisodeBatch, *, create_graph: bool = False, detach_meta: bool = True,
              steps: int | None = None) -> Adapted:
        """Fast weights for one episode, full-size (they apply to any input)."""
        vocab = self.episode_vocab(batch)
        adapted = self._adapt(batch, vocab, create_graph=create_graph, detach_meta=detach_meta, steps=steps)
        if vocab is not None:
            base = self.encoder.named_weights()[vocab.name]
            adapted.encoder[vocab.name] = vocab.unslice(base.detach() if detach_meta else base,
                                                        adapted.encoder[vocab.name])
        return adapted

    # ---- the interface
    def meta_loss(self, batch: EpisodeBatch) -> Outcome:
        """Query loss after adaptation, differentiable w.r.t. the meta-parameters (the whole
        graph at once: `outer_backward` is the path with the memory savers)."""
        vocab = self.episode_vocab(batch)
        adapted = self._adapt(batch, vocab, create_graph=self.second_order, detach_meta=False)
        return _score(query_logits(self.encoder, _remap(vocab, batch.query), adapted), batch.query_y)

    def outer_backward(self, batch: EpisodeBatch, weight: float = 1.0) -> Outcome:
        if self.checkpoint_steps or 0 < self.cfg.query_chunk < len(batch.query_y):
            return self._chunked_outer_backward(batch, weight)
        out = self.meta_loss(batch)
        if out.loss.requires_grad:
            (out.loss * weight).backward()
        return Outcome(float(out.loss.detach()), out.acc)

    def _chunked_outer_backward(self, batch: EpisodeBatch, weight: float) -> Outcome:
        """`outer_backward` holding one chunk of queries' graph at a time.

        The query loss is a mean over queries, so its gradient w.r.t. the adapted weights is
        summed chunk by chunk at detached copies of them; that sum then flows back through the
        inner loop once (replayed step by step under `checkpoint_steps`). Same meta-gradient,
        same work; memory holds the inner loop's graph plus one chunk's instead of the whole
        query set's.
        """
        vocab = self.episode_vocab(batch)
        adapted = self._adapt(batch, vocab, create_graph=self.second_order, detach_meta=False,
                              replayed=self.checkpoint_steps)
        ends = [*adapted.encoder.values(), adapted.head["weight"], adapted.head["bias"]]
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in ends]
        fast = dict(zip(adapted.encoder, leaves[:-2]))
        head = {"weight": leaves[-2], "bias": leaves[-1]}
        query, y = _remap(vocab, batch.query), batch.query_y
        n, total, correct = len(y), 0.0, 0
        for rows in torch.arange(n).split(self.cfg.query_chunk or n):
            logits = head_logits(head, self.encoder({k: v[rows] for k, v in query.items()}, fast))
            loss = F.cross_entropy(logits, y[rows], reduction="sum") / n
            if loss.requires_grad:
                (loss * weight).backward()  # into the leaves, and .grad of weights used as they are
            total += float(loss.detach())
            correct += int((logits.argmax(-1) == y[rows]).sum())
        if adapted.replay is not None:
            adapted.replay([leaf.grad for leaf in leaves])
        else:
            pairs = [(t, leaf.grad) for t, leaf in zip(ends, leaves) if t.requires_grad and leaf.grad is not None]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        return Outcome(total, correct / n)

    def evaluate(self, batch: EpisodeBatch) -> Outcome:
        vocab = self.episode_vocab(batch)
        adapted = self._adapt(batch, vocab, create_graph=False, detach_meta=True)
        with torch.no_grad():
            out = _score(query_logits(self.encoder, _remap(vocab, batch.query), adapted), batch.query_y)
        return Outcome(float(out.loss), out.acc)


def _remap(vocab: EpisodeVocab | None, inputs: Inputs) -> Inputs:
    return inputs if vocab is None else vocab.remap(inputs)


class MAML(MetaLearner):
    name = "maml"


class FOMAML(MetaLearner):
    name = "fomaml"

    @property
    def second_order(self) -> bool:
        return False


class ANIL(MetaLearner):
    """Almost No Inner Loop (Raghu et al., 2020): only the head adapts."""

    name = "anil"
    scope_override = "head"


class MetaSGD(MetaLearner):
    """Meta-SGD (Li et al., 2017): a learned step size per adapted weight, initialised to inner_lr.

    The head is rebuilt per episode with N rows, so its step sizes are per input feature
    (`head.weight`, shape [d], shared by all rows) and one scalar for `head.bias`.
    """

    name = "metasgd"

    def __init__(self, encoder: Encoder, cfg: LearnerConfig):
        super().__init__(encoder, cfg)
        weights = encoder.named_weights()
        dim = _hidden_size(encoder)
        shapes = {n: weights[n].shape for n in self.adapt_names}
        shapes.update({"head.weight": torch.Size([dim]), "head.bias": torch.Size([])})
        self.lrs = nn.ParameterDict(
            {_key(n): nn.Parameter(torch.full(s, cfg.inner_lr, dtype=torch.float32)) for n, s in shapes.items()}
        )

    def inner_lr(self, key: str) -> torch.Tensor:
        return self.lrs[_key(key)]

    def learned_lrs(self) -> dict[str, torch.Tensor]:
        """{parameter name: step sizes} (head ones under head.weight / head.bias)."""
        return {k.replace("__", "."): v.detach() for k, v in self.lrs.items()}


class Reptile(MetaLearner):
    """Reptile (Nichol et al., 2018): the meta-gradient is theta - adapted weights.

    An outer SGD step of size eps moves theta a fraction eps of the way to the weights the
    inner loop reached. Only adapted, trainable encoder weights get a meta-gradient; the
    prototype head is rebuilt per episode and needs none.
    """

    name = "reptile"

    def __init__(self, encoder: Encoder, cfg: LearnerConfig):
        super().__init__(encoder, cfg)
        weights = encoder.named_weights()
        if self.scope == "lora":
            raise ConfigError(
                "meta.algorithm=reptile with meta.adapt=lora: Reptile only moves the adapted weights, and "
                "LoRA's B matrices restart at zero in every episode, so nothing useful would be meta-learned; "
                "use adapt all or top_k with reptile, or maml/fomaml/metasgd with lora"
            )
        if not any(weights[n].requires_grad for n in self.adapt_names):
            raise ConfigError(
                f"meta.algorithm=reptile with meta.adapt={self.scope}: no trainable encoder weight adapts, "
                "so Reptile has nothing to meta-learn; use adapt all, top_k or lora"
            )

    def meta_loss(self, batch: EpisodeBatch) -> Outcome:
        raise NotImplementedError("Reptile has no meta-loss; use outer_backward")

    def outer_backward(self, batch: EpisodeBatch, weight: float = 1.0) -> Outcome:
        vocab = self.episode_vocab(batch)
        adapted = self._adapt(batch, vocab, create_graph=False, detach_meta=True)
        weights = self.encoder.named_weights()
        for n in self.adapt_names:
            p = weights[n]
            if not p.requires_grad:
                continue
            moved = adapted.encoder[n].detach()
            if vocab is not None and n == vocab.name:  # rows outside the slice did not move
                moved = vocab.unslice(p.detach(), moved)
            step = (p.detach() - moved) * weight
            p.grad = step if p.grad is None else p.grad + step
        with torch.no_grad():
            out = _score(query_logits(self.encoder, _remap(vocab, batch.query), adapted), batch.query_y)
        return Outcome(float(out.loss), out.acc)


class ProtoNet(MetaLearner):
    """Prototypical Networks (Snell et al., 2017): no inner loop; a nearest-prototype classifier.

    The classifier is `cfg.centroids`: squared Euclidean (the paper's) or scaled cosine, and
    optionally the class names' embeddings as extra support rows (`label_shots`), which the
    encoder then learns to place among their classes' utterances.
    """

    name = "protonet"
    scope_override = "head"

    @property
    def needs_label_names(self) -> bool:
        return self.cfg.centroids.uses_labels

    @property
    def names_in_support(self) -> int:
        return 0  # the names enter the prototypes through `label_shots`, weighted, not as rows

    def meta_loss(self, batch: EpisodeBatch) -> Outcome:
        c = self.cfg.centroids
        if c.uses_labels and batch.labels is None:
            raise ConfigError("meta.label_shots > 0: build episode batches with label_names=True")
        label_z = self.encoder(batch.labels) if c.uses_labels else None
        protos = c.prototypes(self.encoder(batch.support), batch.support_y, batch.ways, label_z)
        return _score(c.logits(self.encoder(batch.query), protos), batch.query_y)

    def evaluate(self, batch: EpisodeBatch) -> Outcome:
        with torch.no_grad():
            out = self.meta_loss(batch)
        return Outcome(float(out.loss), out.acc)


ALGORITHMS: dict[str, type[MetaLearner]] = {
    c.name: c for c in (MAML, FOMAML, MetaSGD, ANIL, Reptile, ProtoNet)
}


def build_learner(model: nn.Module, cfg: LearnerConfig) -> MetaLearner:
    """Wrap a Hugging Face encoder (`AutoModel`) into the learner `cfg.algorithm` names."""
    cls = ALGORITHMS.get(cfg.algorithm)
    if cls is None:
        raise ConfigError(f"meta.algorithm={cfg.algorithm!r}: allowed {', '.join(ALGORITHMS)}")
    if cfg.adapt == "lora" and cls.scope_override is None:
        model = add_lora(model, cfg.lora_rank, list(cfg.lora_targets) if cfg.lora_targets else None)
    return cls(Encoder(model, cfg.pooling, checkpointing=cfg.checkpointing, length_groups=cfg.length_groups), cfg)


def _key(name: str) -> str:
    return name.replace(".", "__")


def _hidden_size(encoder: Encoder) -> int:
    config = getattr(encoder.model, "config", None)
    for attr in ("hidden_size", "d_model", "dim"):
        if config is not None and isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    raise ConfigError("meta.algorithm=metasgd: cannot read the backbone's hidden size from its config")


__all__ = [
    "ALGORITHMS",
    "ANIL",
    "FOMAML",
    "HEAD_KEYS",
    "MAML",
    "LearnerConfig",
    "MetaLearner",
    "MetaSGD",
    "Outcome",
    "ProtoNet",
    "Reptile",
    "build_learner",
]
