"""Structured pruning: attention heads and FFN neurons physically removed.

Importance is first-order Taylor (Michel et al., 2019, "Are Sixteen Heads Really Better
than One?"; Molchanov et al., 2019): a gate of value 1 multiplies each head's context
vector and each FFN neuron's activation, and the importance of a unit is the mean over
batches of |dL/d gate| for the task loss L on the domain's examples. Head scores are
normalised per layer (L2), then the lowest-scoring units are removed across all layers
(`scope=global`) or the same share in every layer (`scope=layer`); every layer keeps at
least one head and one neuron.

Removal slices the query/key/value rows and attention-output columns of the dropped heads
and the intermediate rows / output columns of the dropped neurons, so matrix products
really shrink (unstructured sparsity would not make stock PyTorch on CPU any faster).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metaloop.adapt import Examples, batches, encode, layers_of
from metaloop.compress.runtime import head_size, n_heads, remove_heads, remove_neurons


@dataclass
class Scores:
    heads: list[torch.Tensor]  # per layer, one score per head
    neurons: list[torch.Tensor]  # per layer, one score per FFN neuron


def importance(
    model: nn.Module, tokenizer, data: Examples, labels: list[str], max_length: int, batch_size: int = 32
) -> Scores:
    """Taylor importance of every head and FFN neuron for the cross-entropy on `data`."""
    layers = layers_of(model)
    head_gates = [torch.ones(n_heads(layer), requires_grad=True) for layer in layers]
    ffn_gates = [torch.ones(layer.intermediate.dense.out_features, requires_grad=True) for layer in layers]
    head_acc = [torch.zeros_like(g) for g in head_gates]
    ffn_acc = [torch.zeros_like(g) for g in ffn_gates]
    hooks = []

    def gate_heads(gate: torch.Tensor, size: int):
        def hook(mod, args):
            x = args[0]
            shaped = x.view(*x.shape[:-1], gate.numel(), size) * gate.view(*([1] * (x.dim() - 1)), -1, 1)
            return (shaped.view(x.shape), *args[1:])
        return hook

    def gate_neurons(gate: torch.Tensor):
        return lambda mod, args: (args[0] * gate, *args[1:])

    for layer, hg, fg in zip(layers, head_gates, ffn_gates):
        hooks.append(layer.attention.output.dense.register_forward_pre_hook(gate_heads(hg, head_size(layer))))
        hooks.append(layer.output.dense.register_forward_pre_hook(gate_neurons(fg)))
    was = model.training
    model.eval()  # no dropout noise in the scores
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    y_all = torch.tensor([labels.index(lab) for lab in data.labels])
    try:
        for idx in batches(len(data), batch_size):
            logits = model(**encode(tokenizer, [data.texts[i] for i in idx], max_length)).logits
            loss = F.cross_entropy(logits, y_all[idx])
            grads = torch.autograd.grad(loss, [*head_gates, *ffn_gates])
            for acc, g in zip([*head_acc, *ffn_acc], grads):
                acc += g.abs() * len(idx)
    finally:
        for h in hooks:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
        model.train(was)
    n = max(1, len(data))
    return Scores([a / n for a in head_acc], [a / n for a in ffn_acc])


def _keep_global(scores: list[torch.Tensor], keep_share: float, minimum: int, normalise: bool) -> list[list[int]]:
    """Indices kept per layer: the top `keep_share` of all units, at least `minimum` per layer."""
    s = [x / (x.norm() + 1e-12) if normalise else x for x in scores]
    total = sum(x.numel() for x in s)
    budget = max(len(s) * minimum, round(keep_share * total))
    keep = [set(torch.topk(x, min(minimum, x.numel())).indices.tolist()) for x in s]
    flat = sorted(((float(v), li, ui) for li, x in enumerate(s) for ui, v in enumerate(x.tolist())), reverse=True)
    chosen = sum(len(k) for k in keep)
    for v, li, ui in flat:
        if chosen >= budget:
            break
        if ui not in keep[li]:
            keep[li].add(ui)
            chosen += 1
    return [sorted(k) for k in keep]


def _keep_per_layer(scores: list[torch.Tensor], keep_share: float, minimum: int) -> list[list[int]]:
    out = []
    for x in scores:
        k = max(minimum, round(keep_share * x.numel()))
        out.append(sorted(torch.topk(x, min(k, x.numel())).indices.tolist()))
    return out


def prune(
    model: nn.Module,
    scores: Scores,
    *,
    heads_keep: float,
    ffn_keep: float,
    scope: str = "global",
    min_heads: int = 1,
    min_neurons: int = 1,
) -> dict:
    """Remove the least important heads and neurons in place; returns what was kept per layer."""
    layers = layers_of(model)
    before = sum(p.numel() for p in model.parameters())
    if scope == "global":
        heads = _keep_global(scores.heads, heads_keep, min_heads, normalise=True)
        neurons = _keep_global(scores.neurons, ffn_keep, min_neurons, normalise=True)
    else:
        heads = _keep_per_layer(scores.heads, heads_keep, min_heads)
        neurons = _keep_per_layer(scores.neurons, ffn_keep, min_neurons)
    for layer, h, i in zip(layers, heads, neurons):
        if len(h) < n_heads(layer):
            remove_heads(layer, h)
        if len(i) < layer.intermediate.dense.out_features:
            remove_neurons(layer, i)
    after = sum(p.numel() for p in model.parameters())
    return {"heads": [len(h) for h in heads], "intermediate": [len(i) for i in neurons],
            "params_before": before, "params_after": after}


def schedule(target: float, rounds: int) -> list[float]:
    """Keep-shares per round (relative to the original) reaching `target` geometrically."""
    return [target ** ((r + 1) / rounds) for r in range(rounds)] if target < 1 else [1.0] * rounds


def relative(share_of_original: float, current: int, original: int) -> float:
    """Keep-share of the *current* units that leaves `share_of_original` of the original."""
    return min(1.0, share_of_original * original / max(1, current))


def units(model: nn.Module) -> tuple[int, int]:
    layers = layers_of(model)
    return sum(n_heads(layer) for layer in layers), sum(layer.intermediate.dense.out_features for layer in layers)
