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

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Head = dict[str, torch.Tensor]  # {"weight": [N, d], "bias": [N]}


def prototypes(z: torch.Tensor, y: torch.Tensor, ways: int, label_z: torch.Tensor | None = None,
               label_shots: float = 0.0) -> torch.Tensor:
    """Class means of the embeddings `z` [S, d] with labels `y` in 0..ways-1 -> [ways, d].

    With `label_z` [ways, d] (the embeddings of the class names) and `label_shots` > 0, each
    class name counts as that many more support rows of its class.
    """
    onehot = F.one_hot(y, ways).to(z.dtype)  # [S, N]
    sums, counts = onehot.t() @ z, onehot.sum(0).unsqueeze(1)
    if label_z is not None and label_shots > 0:
        sums, counts = sums + label_shots * label_z.to(z.dtype), counts + label_shots
    return sums / counts.clamp_min(1e-12)


def label_text(name: str) -> str:
    """A class name as the encoder reads it: `credit_limit_change` -> `credit limit change`."""
    return " ".join(name.replace("_", " ").replace("-", " ").split()) or name


@dataclass(frozen=True)
class Centroids:
    """The nearest-class-mean classifier (ProtoNet's, and every centroid score in metaloop).

    metric       sqeuclidean: logits -||z - c_k||^2 (Snell et al.); cosine: `scale` * cos(z, c_k)
                 on L2-normalised embeddings (what sentence encoders such as all-MiniLM-L6-v2
                 are trained for); `scale` is the softmax temperature of the training loss
                 and does not change a prediction.
    label_shots  the embedding of the class name (`label_text`) joins the class's support
                 rows with this weight (0: names unused). At 1 shot the name is often as
                 informative as the one example: see docs/fewshot.md.
    """

    metric: Literal["sqeuclidean", "cosine"] = "sqeuclidean"
    scale: float = 10.0
    label_shots: float = 0.0

    def __post_init__(self) -> None:
        if self.metric not in ("sqeuclidean", "cosine"):
            raise ValueError(f"centroid metric {self.metric!r}: allowed sqeuclidean, cosine")
        if self.label_shots < 0 or self.scale <= 0:
            raise ValueError("centroids need label_shots >= 0 and scale > 0")

    @property
    def uses_labels(self) -> bool:
        return self.label_shots > 0

    def _prep(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=-1) if self.metric == "cosine" else z

    def prototypes(self, z: torch.Tensor, y: torch.Tensor, ways: int,
                   label_z: torch.Tensor | None = None) -> torch.Tensor:
        if self.uses_labels and label_z is None:
            raise ValueError("label_shots > 0 needs the class-name embeddings (label_z)")
        return prototypes(self._prep(z), y, ways, None if label_z is None else self._prep(label_z),
                          self.label_shots)

    def logits(self, query_z: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        if self.metric == "cosine":
            return self.scale * F.normalize(query_z, dim=-1) @ F.normalize(protos, dim=-1).t()
        return proto_logits(query_z, protos)


def proto_head(z: torch.Tensor, y: torch.Tensor, ways: int) -> Head:
    c = prototypes(z, y, ways)
    return {"weight": 2.0 * c, "bias": -(c * c).sum(-1)}


def head_logits(head: Head, z: torch.Tensor) -> torch.Tensor:
    return z @ head["weight"].t() + head["bias"]


def proto_logits(z: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """ProtoNet logits: negative squared Euclidean distance to each prototype."""
    return -((z.unsqueeze(1) - protos.unsqueeze(0)) ** 2).sum(-1)
