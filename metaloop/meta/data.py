"""Episodes as tensors: tokenized support and query sets with their class indices."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from metaloop.episodes import Episode
from metaloop.meta.head import label_text

Inputs = dict[str, torch.Tensor]


@dataclass
class EpisodeBatch:
    support: Inputs
    support_y: torch.Tensor
    query: Inputs
    query_y: torch.Tensor
    ways: int
    labels: Inputs | None = None  # the class names (`label_text`), when a classifier uses them

    def to(self, device: torch.device | str) -> EpisodeBatch:
        move = lambda d: None if d is None else {k: v.to(device) for k, v in d.items()}
        return EpisodeBatch(move(self.support), self.support_y.to(device), move(self.query),
                            self.query_y.to(device), self.ways, move(self.labels))

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens in the episode, for FLOP accounting."""
        sets = [self.support, self.query] + ([self.labels] if self.labels is not None else [])
        return int(sum(s["attention_mask"].sum() for s in sets))


def tokenize(tokenizer, texts: list[str], max_length: int, padding: str = "longest") -> Inputs:
    enc = tokenizer(texts, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def episode_batch(
    episode: Episode,
    texts: Callable[[Iterable[str]], list[str]],
    tokenizer,
    max_length: int,
    padding: str = "longest",
    label_names: bool = False,
    names_in_support: int = 0,
) -> EpisodeBatch:
    """Tokenize an `Episode`; `texts` maps row ids to texts (e.g. `Pool.texts`).

    padding="longest" pads each set to its longest text (dynamic padding);
    "max_length" pads everything to `max_length`. label_names=True also tokenizes the class
    names (`episode.labels` through `label_text`), for classifiers with `label_shots` > 0.
    names_in_support=k appends every class name k times to the support set, labelled with
    its class: the MAML family's way of reading the names (their head starts at the support
    prototypes and their inner loop trains on the support rows).
    """
    names = [label_text(n) for n in episode.labels]
    return EpisodeBatch(
        support=tokenize(tokenizer, texts(episode.support_ids) + names * names_in_support, max_length, padding),
        support_y=torch.tensor(list(episode.support_y) + list(range(episode.ways)) * names_in_support,
                               dtype=torch.long),
        query=tokenize(tokenizer, texts(episode.query_ids), max_length, padding),
        query_y=torch.tensor(episode.query_y, dtype=torch.long),
        ways=episode.ways,
        labels=tokenize(tokenizer, names, max_length, padding) if label_names else None,
    )
