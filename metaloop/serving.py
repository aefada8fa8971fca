"""Predict (label, score) with any saved domain classifier, from disk alone.

A classifier folder is what adaptation or compression writes (fp32 safetensors, pruned or
distilled safetensors, int8 torch or ONNX; see `metaloop.compress.runtime`), with its
tokenizer and label names. Nothing is unpickled. The MLflow pyfunc wraps this.

An ONNX folder (the default int8 champion) loads through `metaloop.onnx_runtime`: numpy,
onnxruntime and tokenizers, no torch. Any other folder needs torch and transformers.

    clf = load_classifier("artifacts/adapted/hospitality/int8")
    clf.top_k(["can I keep the room until 2pm?"], k=2)   # [[(label, prob), (label, prob)]]
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from metaloop.onnx_runtime import OnnxTextClassifier, is_onnx_folder


def _top(probs: np.ndarray, labels: list[str], k: int) -> list[list[tuple[str, float]]]:
    k = max(1, min(k, len(labels)))
    return [[(labels[i], float(p[i])) for i in np.argsort(-p, kind="stable")[:k]] for p in probs]


class TextClassifier:
    """A torch (or torch int8) classifier folder behind the same `top_k` as the ONNX one."""

    def __init__(self, classifier, batch_size: int = 32):
        self.classifier, self.batch_size = classifier, batch_size
        self.labels = classifier.labels

    def top_k(self, texts: Sequence[str], k: int = 1) -> list[list[tuple[str, float]]]:
        out: list[list[tuple[str, float]]] = []
        for start in range(0, len(texts), self.batch_size):
            logits = self.classifier.logits(self.classifier.encode(list(texts[start : start + self.batch_size])))
            z = np.exp(logits - logits.max(-1, keepdims=True))
            out += _top(z / z.sum(-1, keepdims=True), self.labels, k)
        return out


class OnnxServing(OnnxTextClassifier):
    def top_k(self, texts: Sequence[str], k: int = 1) -> list[list[tuple[str, float]]]:
        return self.predict(list(texts), top_k=k)


def load_classifier(folder: str | Path) -> TextClassifier | OnnxServing:
    if is_onnx_folder(folder):
        return OnnxServing(folder)
    from metaloop.compress.runtime import load_classifier as load_any  # torch, transformers

    return TextClassifier(load_any(Path(folder)))
