"""Sentence embeddings from token states: `mean` (over real tokens) or `cls` (first token)."""

from __future__ import annotations

import torch

POOLINGS = ("mean", "cls")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, kind: str) -> torch.Tensor:
    """`hidden` [B, T, d] -> [B, d]. Padding never contributes to `mean`."""
    if kind == "cls":
        return hidden[:, 0]
    if kind != "mean":
        raise ValueError(f"unknown pooling {kind!r}; allowed: {', '.join(POOLINGS)}")
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
