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

from metaloop.meta.data import Inputs
from metaloop.meta.encoder import Encoder, GroupedPrefix, Params, Prefix, attention_for
from metaloop.meta.head import Head, head_logits, proto_head

HEAD_KEYS = ("head.weight", "head.bias")
LearningRate = Callable[[str], "float | torch.Tensor"]


@dataclass
class Adapted:
    encoder: Params  # adapted encoder weights (only the adapted names)
    head: Head
    support_losses: list[float] = field(default_factory=list)
    # Set by `inner_loop_replayed`, whose weights carry no graph: send d(loss)/d(weights)
    # (same order as [*encoder.values(), head weight, head bias]) back to the meta-parameters.
    replay: Callable[[list[torch.Tensor | None]], None] | None = None


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


@dataclass
class _Support:
    """What every inner step needs: the encoder, the support set, the adapted names."""

    encoder: Encoder
    inputs: Inputs
    y: torch.Tensor
    keys: list[str]
    lr: LearningRate
    prefix: Prefix | GroupedPrefix | None

    def forward(self, cur: list[torch.Tensor], create_graph: bool) -> torch.Tensor:
        with attention_for(create_graph and bool(self.keys)):
            return self.encoder(self.inputs, dict(zip(self.keys, cur)), prefix=self.prefix)

    def step(self, z: torch.Tensor | None, cur: list[torch.Tensor], w: torch.Tensor, b: torch.Tensor,
             *, create_graph: bool, retain: bool) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, float]:
        """One SGD step of (fast weights, head weight, head bias); also the support loss."""
        with torch.enable_grad(), attention_for(create_graph and bool(self.keys)):
            if z is None:
                z = self.forward(cur, create_graph)
            # Inner gradients are partial derivatives: the head is its own fast weight, so
            # the encoder's gradient flows through the logits only, never through the head's
            # initialisation (which shares step 0's forward). Hence the alias `z_in`.
            z_in = z.view_as(z)
            loss = F.cross_entropy(head_logits({"weight": w, "bias": b}, z_in), self.y)
            g_z, g_w, g_b = torch.autograd.grad(loss, [z_in, w, b], create_graph=create_graph, retain_graph=True)
            new = cur
            if self.keys:
                g_enc = torch.autograd.grad(z_in, cur, grad_outputs=g_z, create_graph=create_graph,
                                            retain_graph=retain, allow_unused=True)
                new = [t if g is None else t - self.lr(k) * g for k, t, g in zip(self.keys, cur, g_enc)]
        return new, w - self.lr("head.weight") * g_w, b - self.lr("head.bias") * g_b, float(loss.detach())


def _setup(encoder, support, support_y, names, lr, start, detach_meta) -> tuple[_Support, list[torch.Tensor]]:
    weights = {**encoder.named_weights(), **(start or {})}
    fast = [_leaf(weights[n]) if detach_meta or not weights[n].requires_grad else weights[n] for n in names]
    # Layers below every adapted weight give the same output at every step: run them once.
    split = encoder.split_point(names)
    prefix = None
    if split:
        with torch.set_grad_enabled(not detach_meta and torch.is_grad_enabled()):
            prefix = encoder.prefix(support, split)
    return _Support(encoder, support, support_y, list(names), lr, prefix), fast


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
    start: Params | None = None,
) -> Adapted:
    """Adapt `names` (encoder parameters) and the head for `steps` steps.

    detach_meta=True starts from detached copies (evaluation, Reptile): nothing links the
    result to the meta-parameters. Frozen parameters (requires_grad=False) adapt from a
    detached copy and so never receive a meta-gradient; parameters the loss does not use get
    a zero gradient instead of an error.

    `start` replaces some starting weights by functions of them (an `EpisodeVocab` slice of
    the word embeddings: the inputs then index the slice).
    """
    sup, cur = _setup(encoder, support, support_y, names, lr, start, detach_meta)
    # Unless detached, the first forward is also the head's initialisation: keep its graph.
    retain = create_graph or not detach_meta
    z = sup.forward(cur, create_graph)
    init = proto_head(z.detach() if detach_meta else z.view_as(z), support_y, ways)
    w, b = (v if v.requires_grad else _leaf(v) for v in (init["weight"], init["bias"]))
    losses: list[float] = []
    for k in range(steps):
        reuse = z if k == 0 or not names else None  # step 0 reuses the head's forward
        cur, w, b, loss = sup.step(reuse, cur, w, b, create_graph=create_graph, retain=retain)
        losses.append(loss)
    return Adapted(dict(zip(names, cur)), {"weight": w, "bias": b}, losses)


def inner_loop_replayed(
    encoder: Encoder,
    support: Inputs,
    support_y: torch.Tensor,
    ways: int,
    names: list[str],
    *,
    steps: int,
    lr: LearningRate,
    start: Params | None = None,
) -> Adapted:
    """Second-order `inner_loop` that keeps one step's graph at a time (the memory saver).

    The forward pass keeps only each step's starting weights (no graph) and the last step's
    graph. `Adapted.replay(grads)` then walks the steps backwards: it re-runs step k with
    its graph from the stored weights, sends the incoming gradient through it (a
    vector-Hessian product, and the learned step sizes' gradients), and frees it before
    step k-1. The meta-gradient is MAML's exactly; the price is one more forward and backward
    of the support set per step but the last.
    """
    sup, theta = _setup(encoder, support, support_y, names, lr, start, detach_meta=False)
    prefix = sup.prefix
    if prefix is not None:  # one backward through the shared lower layers, at the end
        sup.prefix = prefix.with_tensors([_leaf(h) if h.requires_grad else h for h in prefix.tensors()])
    cur = [_leaf(t) for t in theta]
    with torch.enable_grad():
        z = sup.forward(cur, False)
    init = proto_head(z.detach(), support_y, ways)
    state = (cur, _leaf(init["weight"]), _leaf(init["bias"]))
    starts, losses, kept = [], [], None
    for k in range(steps):
        starts.append(tuple(t.detach() for t in (*state[0], state[1], state[2])))
        last = k == steps - 1 and k > 0
        reuse = z if k == 0 else None  # step 0 reuses the head's forward
        new_cur, new_w, new_b, loss = sup.step(reuse, *state, create_graph=last, retain=last)
        losses.append(loss)
        if last:
            kept = (state, (*new_cur, new_w, new_b))
        state = ([_leaf(t) for t in new_cur], _leaf(new_w), _leaf(new_b))

    def replay(grads: list[torch.Tensor | None]) -> None:
        nonlocal kept
        for k in reversed(range(steps)):
            if kept is not None:
                (cur, w, b), out = kept
                kept = None
            elif k > 0:
                values = starts[k]
                cur, w, b = [_leaf(t) for t in values[:-2]], _leaf(values[-2]), _leaf(values[-1])
                new_cur, new_w, new_b, _ = sup.step(None, cur, w, b, create_graph=True, retain=True)
                out = (*new_cur, new_w, new_b)
            else:  # step 0 from the meta-parameters, its head initialised by its own forward
                with torch.enable_grad():
                    z0 = sup.forward(theta, True)
                    head = proto_head(z0.view_as(z0), support_y, ways)
                new_cur, new_w, new_b, _ = sup.step(z0, theta, head["weight"], head["bias"],
                                                    create_graph=True, retain=True)
                out = (*new_cur, new_w, new_b)
            pairs = [(o, g) for o, g in zip(out, grads) if g is not None and o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            if k > 0:
                grads = [t.grad for t in (*cur, w, b)]
            del out
        if prefix is not None:
            pairs = [(h, leaf.grad) for h, leaf in zip(prefix.tensors(), sup.prefix.tensors())
                     if leaf.grad is not None]
            if pairs:
                torch.autograd.backward([h for h, _ in pairs], [g for _, g in pairs])

    return Adapted(dict(zip(names, state[0])), {"weight": state[1], "bias": state[2]}, losses, replay)


def query_logits(encoder: Encoder, query: Inputs, adapted: Adapted) -> torch.Tensor:
    """Logits of the query set under the adapted encoder and head."""
    return head_logits(adapted.head, encoder(query, adapted.encoder))
