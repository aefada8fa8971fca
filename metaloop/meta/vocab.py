"""Episode vocabulary: the inner loop adapts only the word-embedding rows an episode uses.

An episode of short texts touches a few hundred of a backbone's ~30k vocabulary rows, yet
the word-embedding matrix is half of MiniLM's weights. Adapted as a whole, every inner step
would hold a dense fast copy of it and a dense gradient (mostly zeros) and, second order,
differentiate through both. The inner gradient of a row no input uses is zero, so those rows
never move: adapting `weight[ids]` for the rows the support *and* query sets use, with the
input ids renumbered to index that slice, is the same function with the same gradients.
The meta-gradient reaches the full matrix through the slice's gather (one index_add).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Inputs = dict[str, torch.Tensor]


def word_embedding_name(model: torch.nn.Module) -> str | None:
    """Parameter name of `model`'s input word-embedding matrix (None: not found)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if weight is None:
        return None
    return next((n for n, p in model.named_parameters() if p is weight), None)


@dataclass(frozen=True)
class EpisodeVocab:
    """The sorted token ids an episode uses, and the renumbering onto them."""

    name: str  # the word-embedding parameter this vocabulary slices
    ids: torch.Tensor  # sorted unique token ids

    @classmethod
    def of(cls, name: str, *sets: Inputs | None) -> EpisodeVocab:
        ids = torch.cat([s["input_ids"].reshape(-1) for s in sets if s is not None])
        return cls(name, torch.unique(ids))  # sorted

    def __len__(self) -> int:
        return int(self.ids.numel())

    def remap(self, inputs: Inputs | None) -> Inputs | None:
        """The same inputs with ids pointing into the slice (every id must be in the vocabulary)."""
        if inputs is None:
            return None
        return {**inputs, "input_ids": torch.searchsorted(self.ids, inputs["input_ids"])}

    def slice(self, weight: torch.Tensor) -> torch.Tensor:
        """The rows of `weight` this vocabulary uses (differentiable w.r.t. `weight`)."""
        return weight.index_select(0, self.ids)

    def unslice(self, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`weight` with the vocabulary's rows replaced by `rows` (a full-size matrix)."""
        return weight.index_copy(0, self.ids, rows)

    def lr(self, lr: Callable[[str], float | torch.Tensor]) -> Callable[[str], float | torch.Tensor]:
        """`lr` with per-row step sizes of the sliced matrix (Meta-SGD's) sliced the same way."""

        def sliced(key: str) -> float | torch.Tensor:
            value = lr(key)
            if key == self.name and isinstance(value, torch.Tensor) and value.dim() >= 1:
                return self.slice(value)
            return value

        return sliced
