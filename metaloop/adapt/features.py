"""Tokenising, pooled features, the prototype head and scoring for a classifier model.

    encode(tokenizer, texts, max_length)              # dynamic padding, torch tensors
    prototype_init(model, tokenizer, train, labels, max_length)   # W_k = 2 c_k, b_k = -|c_k|^2
    accuracy(model, tokenizer, test, labels, max_length)           # (accuracy, loss)
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from metaloop.errors import ConfigError
from metaloop.adapt.data import Examples
from metaloop.adapt import torch_state


def encode(tokenizer, texts: Sequence[str], max_length: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Tokenize; dynamic padding unless `pad_to` (then padded/truncated to exactly that)."""
    enc = tokenizer(
        list(texts), truncation=True, max_length=pad_to or max_length,
        padding="max_length" if pad_to else True, return_tensors="pt",
    )
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def batches(n: int, size: int, rng: random.Random | None = None) -> Iterator[list[int]]:
    order = list(range(n))
    if rng is not None:
        rng.shuffle(order)
    for i in range(0, n, size):
        yield order[i : i + size]


def final_linear(model: nn.Module) -> nn.Linear:
    """The classifier's last linear layer (BERT: `classifier`; RoBERTa-like: `classifier.out_proj`;
    a `CentroidClassifier`: its class vectors, `centroids`)."""
    if isinstance(getattr(model, "centroids", None), nn.Linear):
        return model.centroids
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Linear):
        return head
    for name in ("out_proj", "dense"):
        if isinstance(getattr(head, name, None), nn.Linear):
            return getattr(head, name)
    raise ConfigError(f"{type(model).__name__}: cannot find the classifier's final linear layer")


def head_modules(model: nn.Module) -> list[str]:
    """Top-level module names forming the classification head (trained by every strategy)."""
    if isinstance(getattr(model, "centroids", None), nn.Linear):
        return ["centroids"]
    names = ["classifier"]
    base = model.base_model
    if getattr(base, "pooler", None) is not None:
        names.append(f"{model.base_model_prefix}.pooler")
    return names


def layers_of(model: nn.Module) -> nn.ModuleList:
    base = model.base_model
    enc = getattr(base, "encoder", None)
    layers = getattr(enc, "layer", None) if enc is not None else None
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(
            f"{type(model).__name__}: no `encoder.layer` stack; BERT-like encoders (BERT, MiniLM, RoBERTa) "
            "are supported"
        )
    return layers


@torch.no_grad()
def pooled_features(model: nn.Module, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 64):
    """Inputs of the final linear layer (what the classifier sees) for `texts`, in eval mode."""
    lin = final_linear(model)
    seen: list[torch.Tensor] = []
    hook = lin.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    was = model.training
    model.eval()
    try:
        for idx in batches(len(texts), batch_size):
            model(**encode(tokenizer, [texts[i] for i in idx], max_length))
    finally:
        hook.remove()
        model.train(was)
    return torch.cat(seen)


@torch.no_grad()
def prototype_init(model: nn.Module, tokenizer, examples: Examples, labels: list[str], max_length: int) -> None:
    """Set the final linear layer to the nearest-centroid classifier of `examples`.

    A `CentroidClassifier`'s class vectors become its rule's prototypes (class names
    included when the rule's label_shots > 0); a linear head gets W_k = 2 c_k, b_k = -||c_k||^2.
    """
    from metaloop.centroid_classifier import CentroidLayer
    from metaloop.meta.head import label_text

    z = pooled_features(model, tokenizer, examples.texts, max_length)
    y = torch.tensor([labels.index(lab) for lab in examples.labels])
    lin = final_linear(model)
    if isinstance(lin, CentroidLayer):
        rule = lin.rule
        names = pooled_features(model, tokenizer, [label_text(n) for n in labels], max_length) \
            if rule.uses_labels else None
        lin.weight.copy_(rule.prototypes(z, y, len(labels), names))
        return
    onehot = F.one_hot(y, len(labels)).to(z.dtype)
    c = onehot.t() @ z / onehot.sum(0).clamp_min(1).unsqueeze(1)
    lin.weight.copy_(2.0 * c)
    lin.bias.copy_(-(c * c).sum(-1))


@torch.no_grad()
def predict_logits(model: nn.Module, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 128):
    was = model.training
    model.eval()
    try:
        outs = [model(**encode(tokenizer, [texts[i] for i in idx], max_length)).logits.float()
                for idx in batches(len(texts), batch_size)]
    finally:
        model.train(was)
    return torch.cat(outs) if outs else torch.empty(0)


def accuracy(model: nn.Module, tokenizer, data: Examples, labels: list[str], max_length: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on `data`."""
    logits = predict_logits(model, tokenizer, data.texts, max_length)
    y = torch.tensor([labels.index(lab) for lab in data.labels])
    return float((logits.argmax(-1) == y).float().mean()), float(F.cross_entropy(logits, y))


@torch.no_grad()
def centroid_accuracy(init: str | Path, train: Examples, test: Examples, labels: list[str], max_length: int,
                      pooling: str = "mean", centroids=None) -> float:
    """Accuracy of the bare encoder with a nearest-centroid head over `train`: the embedding
    meta-training optimises, before any adaptation. `centroids` (`metaloop.meta.head.Centroids`,
    i.e. `params.meta.centroids()`) is the classifier meta-training used; default squared
    Euclidean without class names, as the original ProtoNet.

    It runs alone among this process's torch blocks (`seeded`, `torch_threads`), as
    evaluation does: in the flow's `threads` runner another domain may be timing its latency."""
    with torch_state.TORCH_STATE:  # looked up at call time: tests observe the lock
        return _centroid_accuracy(init, train, test, labels, max_length, pooling, centroids)


def _centroid_accuracy(init, train: Examples, test: Examples, labels: list[str], max_length: int, pooling: str,
                       centroids) -> float:
    from metaloop.backbone import load_backbone
    from metaloop.meta.head import Centroids, label_text
    from metaloop.meta.pooling import pool

    centroids = centroids or Centroids()
    model, tokenizer = load_backbone(str(init))
    model.eval()

    def embed(texts: Sequence[str]) -> torch.Tensor:
        out = []
        for idx in batches(len(texts), 128):
            enc = encode(tokenizer, [texts[i] for i in idx], max_length)
            out.append(pool(model(**enc).last_hidden_state, enc["attention_mask"], pooling))
        return torch.cat(out)

    y = torch.tensor([labels.index(lab) for lab in train.labels])
    names = embed([label_text(n) for n in labels]) if centroids.uses_labels else None
    protos = centroids.prototypes(embed(train.texts), y, len(labels), names)
    pred = centroids.logits(embed(test.texts), protos).argmax(-1)
    truth = torch.tensor([labels.index(lab) for lab in test.labels])
    return float((pred == truth).float().mean())
