"""The centroid classifier as a standalone model: encoder -> mean pooling -> class vectors.

    model = CentroidClassifier.from_encoder("artifacts/meta/model", labels, Centroids("cosine", 20, 1))
    model(**tokenizer(texts, padding=True, return_tensors="pt")).logits   # [B, len(labels)]

Why it exists: the few-shot benchmark's winner (docs/fewshot.md) reads a domain through
the embedding meta-training shapes, the encoder's token states mean-pooled, and classifies
it with ProtoNet's classifier (cosine x scale, class vectors started at the prototypes,
class names as support rows), fine-tuned with the encoder. transformers' stock BERT
classifier pools through [CLS] -> dense -> tanh instead, a path meta-training never trains;
fine-tuned from the same ProtoNet encoder it scored 13 / 6 / 2 points below this head at
1 / 5 / 10 shots on CLINC150's meta-val domain (docs/fewshot.md, session 6).

It quacks like a stock `*ForSequenceClassification` where metaloop relies on it:
`model(**inputs).logits`, `.config` (with `id2label`), `.base_model` (the encoder, so layer
stacks, distillation, pruning and vocabulary trimming work unchanged), `.centroids` as the
final linear layer, ONNX export and int8 (the class vectors stay fp32). Saved folders keep
the encoder's keys (`bert.*`) and `centroids.weight`; `config.json` carries
`metaloop_classifier`, which `metaloop.compress.runtime.build_skeleton` reads to rebuild it.
`AutoModel.from_pretrained(folder)` loads the encoder alone.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from metaloop.meta.head import Centroids
from metaloop.meta.pooling import pool

CONFIG_KEY = "metaloop_classifier"


class CentroidLayer(nn.Linear):
    """Class vectors [N, d] scored by a `Centroids` rule (cosine x scale, or -squared distance).

    A subclass of `nn.Linear` so that code looking for the final linear layer (hooks reading
    its input, prototype initialisation) finds it; quantization matches types exactly, so
    int8 leaves it, a few KB, in fp32.
    """

    def __init__(self, dim: int, n_classes: int, centroids: Centroids):
        super().__init__(dim, n_classes, bias=False)
        self.rule = centroids

    @classmethod
    def of(cls, protos: torch.Tensor, rule: Centroids) -> CentroidLayer:
        """A layer whose class vectors start as (a copy of) `protos` [N, d]."""
        layer = cls(protos.shape[1], protos.shape[0], rule)
        with torch.no_grad():
            layer.weight.copy_(protos.detach())
        return layer

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.rule.logits(z, self.weight)


class CentroidClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, centroids: Centroids, pooling: str = "mean"):
        super().__init__()
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # [CLS] pooler: unused by mean pooling, so not trained, saved or quantized
        self.base_model_prefix = encoder.base_model_prefix
        setattr(self, self.base_model_prefix, encoder)
        self.config = encoder.config
        self.pooling = pooling
        self.config.update({CONFIG_KEY: {"metric": centroids.metric, "scale": centroids.scale,
                                         "label_shots": centroids.label_shots, "pooling": pooling}})
        self.centroids = CentroidLayer(self.config.hidden_size, self.config.num_labels, centroids)

    # ------------------------------------------------------------ construction

    @staticmethod
    def spec(config) -> tuple[Centroids, str] | None:
        """(rule, pooling) when `config` describes a centroid classifier, else None."""
        raw = getattr(config, CONFIG_KEY, None)
        if not raw:
            return None
        return Centroids(raw["metric"], float(raw["scale"]), float(raw.get("label_shots", 0.0))), raw["pooling"]

    @classmethod
    def from_config(cls, config, attn_implementation: str = "sdpa") -> CentroidClassifier:
        """Weights uninitialised (they are loaded afterwards), as `AutoModel.from_config`."""
        from transformers import AutoModel

        rule, pooling = cls.spec(config)
        return cls(AutoModel.from_config(config, attn_implementation=attn_implementation), rule, pooling)

    @classmethod
    def from_encoder(cls, init: str | Path, labels: list[str], centroids: Centroids, pooling: str = "mean",
                     attn_implementation: str = "sdpa") -> CentroidClassifier:
        """`init`'s encoder (any AutoModel folder or id; a classifier folder's encoder too) and
        `len(labels)` zero class vectors, to be set from prototypes."""
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a classifier folder's head weights are expected to be unused
        try:
            encoder = AutoModel.from_pretrained(str(init), attn_implementation=attn_implementation,
                                                dtype=torch.float32)
        finally:
            hf_logging.set_verbosity(level)
        encoder.config.update({"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                               "label2id": {lab: i for i, lab in enumerate(labels)}})
        model = cls(encoder, centroids, pooling)
        nn.init.zeros_(model.centroids.weight)
        return model

    # ------------------------------------------------------------ what callers use

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix)

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    def set_input_embeddings(self, emb: nn.Module) -> None:
        self.base_model.set_input_embeddings(emb)

    def set_attn_implementation(self, impl: str) -> None:
        self.base_model.set_attn_implementation(impl)

    def embed(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states=False):
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              output_hidden_states=output_hidden_states, **kw)
        return pool(out.last_hidden_state, attention_mask, self.pooling), out

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states=False, **_):
        from transformers.modeling_outputs import SequenceClassifierOutput

        z, out = self.embed(input_ids, attention_mask, token_type_ids, output_hidden_states)
        return SequenceClassifierOutput(logits=self.centroids(z),
                                        hidden_states=out.hidden_states if output_hidden_states else None)
