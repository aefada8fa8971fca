"""The inner loop: adapt fast weights to one episode's support set by gradient descent.

Fast weights are a dict {name: tensor}; step k+1 is `w - lr(name) * dL_support/dw` taken at
step k's weights. With `create_graph=True` the gradients keep their graph, so a loss of the
adapted weights differentiates back through every step (second-order MAML); with `False`
they are constants (first order) while the path through the starting weights, the
prototype-initialised head and learned learning rates stays differentiable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from metaloop.meta.data import Inputs
from metaloop.meta.encoder import Encoder, Params, attention_for
from metaloop.meta.head import Head, head_logits, proto_head

HEAD_KEYS = ("head.weight", "head.bias")
LearningRate = Callable[[str], "float | torch.Tensor"]


@dataclass
class Adapted:
    encoder: Params  # adapted encoder weights (only the adapted names)
    head: Head
    support_losses: list[float] = field(default_factory=list)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def inner_loop(
    encoder: Encoder,
    support: Inputs,
    support_y: torch.Tensor,
    ways: int,
    names: list[str],
    *,
    steps: int,
    lr: LearningRate,
    create_graph: bool,
    detach_meta: bool = False,
    checkpoint_steps: bool = False,
) -> Adapted:
    """Adapt `names` (encoder parameters) and the head for `steps` steps.

    detach_meta=True starts from detached copies (evaluation, Reptile): nothing links the
    result to the meta-parameters. Frozen parameters (requires_grad=False) adapt from a
    detached copy and so never receive a meta-gradient; parameters the loss does not use get
    a zero gradient instead of an error.

    checkpoint_steps=True (second order only) keeps no graph of steps after the first:
    each is recomputed, one at a time, when the meta-gradient flows back through it
    (non-reentrant `torch.utils.checkpoint` around the whole step, inner `autograd.grad`
    included), so memory holds one step's graph instead of `steps` of them.
    """
    weights = encoder.named_weights()
    fast = {n: _leaf(weights[n]) if detach_meta or not weights[n].requires_grad else weights[n] for n in names}
    keys = list(fast)
    # Unless detached, the first forward is also the head's initialisation: keep its graph.
    retain = create_graph or not detach_meta
    losses: list[float] = []
    recording = [True]  # a checkpointed step re-run during the backward pass logs nothing
    # Layers below every adapted weight give the same output at every step: run them once.
    split = encoder.split_point(names)
    prefix = None
    if split:
        with torch.set_grad_enabled(not detach_meta and torch.is_grad_enabled()):
            prefix = encoder.prefix(support, split)

    def step(z: torch.Tensor | None, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One SGD step: (fast weights..., head weight, head bias) -> the same, updated."""
        cur, w, b = list(tensors[:-2]), tensors[-2], tensors[-1]
        with torch.enable_grad(), attention_for(create_graph and bool(names)):
            if z is None:
                z = encoder(support, dict(zip(keys, cur)), prefix=prefix)
            # Inner gradients are partial derivatives: the head is its own fast weight, so
            # the encoder's gradient flows through the logits only, never through the head's
            # initialisation (which shares step 0's forward). Hence the alias `z_in`.
            z_in = z.view_as(z)
            loss = F.cross_entropy(head_logits({"weight": w, "bias": b}, z_in), support_y)
            if recording[0]:
                losses.append(float(loss.detach()))
            g_z, g_w, g_b = torch.autograd.grad(loss, [z_in, w, b], create_graph=create_graph, retain_graph=True)
            new = cur
            if names:
                g_enc = torch.autograd.grad(z_in, cur, grad_outputs=g_z, create_graph=create_graph,
                                            retain_graph=retain, allow_unused=True)
                new = [t if g is None else t - lr(k) * g for k, t, g in zip(keys, cur, g_enc)]
            return (*new, w - lr("head.weight") * g_w, b - lr("head.bias") * g_b)

    with attention_for(create_graph and bool(names)):
        z = encoder(support, fast, prefix=prefix)
    init = proto_head(z.detach() if detach_meta else z.view_as(z), support_y, ways)
    state = (*fast.values(), *(v if v.requires_grad else _leaf(v) for v in (init["weight"], init["bias"])))
    for k in range(steps):
        reuse = z if k == 0 or not names else None  # step 0 reuses the head's forward
        if checkpoint_steps and create_graph and names and k > 0:
            state = checkpoint(step, None, *state, use_reentrant=False)
        else:
            state = step(reuse, *state)
    recording[0] = False
    return Adapted(dict(zip(keys, state[:-2])), {"weight": state[-2], "bias": state[-1]}, losses)


def query_logits(encoder: Encoder, query: Inputs, adapted: Adapted) -> torch.Tensor:
    """Logits of the query set under the adapted encoder and head."""
    return head_logits(adapted.head, encoder(query, adapted.encoder))
