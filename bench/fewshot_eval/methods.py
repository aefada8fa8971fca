"""Scoring fixed evaluation episodes, and the methods that need no fine-tuning.

    cache = EmbeddingCache(encoder, tokenizer, max_length=64)
    method = FrozenCentroid(cache, params.meta.centroids())   # ProtoNet's classifier, frozen encoder
    method = CentroidHeadFit(cache, centroids, steps=50)      # the prototypes fitted as a head
    scores = score_episodes("frozen-centroid", method, episodes, pool.texts)
    summary = summarise(scores)                                # {shots: Summary(mean, ci95, n, sd)}
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Protocol

import torch
import torch.nn.functional as F
from pydantic import Field

from .stats import Summary
from .stats import mean_ci95
from metaloop.episodes import Episode
from metaloop.meta.data import tokenize
from metaloop.meta.encoder import Encoder
from metaloop.meta.head import Centroids, label_text

TextsOf = Callable[[Iterable[str]], list[str]]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


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
