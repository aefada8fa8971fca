"""Predict (label, score) with any saved domain classifier, from disk alone.

A classifier folder is what adaptation or compression writes (fp32 safetensors, pruned or
distilled safetensors, int8 torch or ONNX; see `metaloop.compress.runtime`), with its
tokenizer and label names. Nothing is unpickled. The MLflow pyfunc wraps this.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from metaloop.compress.runtime import Classifier
from metaloop.compress.runtime import load_classifier as load_any


@dataclass
class Prediction:
    label: str
    score: float


class TextClassifier:
    def __init__(self, classifier: Classifier, batch_size: int = 32):
        self.classifier, self.batch_size = classifier, batch_size
        self.labels = classifier.labels

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        out: list[Prediction] = []
        for start in range(0, len(texts), self.batch_size):
            logits = self.classifier.logits(self.classifier.encode(list(texts[start : start + self.batch_size])))
            z = np.exp(logits - logits.max(-1, keepdims=True))
            probs = z / z.sum(-1, keepdims=True)
            out += [Prediction(self.labels[i], float(p[i])) for i, p in zip(probs.argmax(-1), probs)]
        return out


def load_classifier(folder: str | Path) -> TextClassifier:
    return TextClassifier(load_any(Path(folder)))
