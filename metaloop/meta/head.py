"""A classification head for any number of classes: the prototype-initialised linear head.

Episodes have different label sets and different N, so no fixed-size head can be
meta-learned. Instead every episode builds its head from the support set, as in
Proto-MAML (Triantafillou et al., 2020, "Meta-Dataset"):

    c_k  = mean of the support embeddings of class k           (the prototypes)
    W_k  = 2 c_k,   b_k = -||c_k||^2
    logit_k(z) = W_k . z + b_k = -||z - c_k||^2 + ||z||^2

so before any inner step the head is exactly a ProtoNet (squared Euclidean) classifier,
and the inner loop then fine-tunes it like an ordinary linear layer. The head is a
function of the encoder's parameters; in MAML/Meta-SGD/ANIL the meta-gradient flows
through this initialisation too (first-order variants keep that path as well, as
fo-Proto-MAML does). Nothing about the head is stored: a downstream domain rebuilds it
from its own support examples, for any N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Head = dict[str, torch.Tensor]  # {"weight": [N, d], "bias": [N]}


def prototypes(z: torch.Tensor, y: torch.Tensor, ways: int) -> torch.Tensor:
    """Class means of the embeddings `z` [S, d] with labels `y` in 0..ways-1 -> [ways, d]."""
    onehot = F.one_hot(y, ways).to(z.dtype)  # [S, N]
    counts = onehot.sum(0).clamp_min(1.0).unsqueeze(1)
    return onehot.t() @ z / counts


def proto_head(z: torch.Tensor, y: torch.Tensor, ways: int) -> Head:
    c = prototypes(z, y, ways)
    return {"weight": 2.0 * c, "bias": -(c * c).sum(-1)}


def head_logits(head: Head, z: torch.Tensor) -> torch.Tensor:
    return z @ head["weight"].t() + head["bias"]


def proto_logits(z: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """ProtoNet logits: negative squared Euclidean distance to each prototype."""
    return -((z.unsqueeze(1) - protos.unsqueeze(0)) ** 2).sum(-1)
