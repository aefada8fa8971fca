"""Load a saved domain classifier from disk and predict (label, score) for texts.

A classifier folder is what adaptation and compression write: a Hugging Face
`AutoModelForSequenceClassification` (safetensors, label names in its config) with its
tokenizer. Nothing is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch


@dataclass
class Prediction:
    label: str
    score: float


class TextClassifier:
    def __init__(self, folder: str | Path, max_length: int = 128, batch_size: int = 32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.folder = Path(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.folder, use_safetensors=True).eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.max_length, self.batch_size = max_length, batch_size

    @torch.inference_mode()
    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        out: list[Prediction] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start : start + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            probs = self.model(**batch).logits.float().softmax(-1)
            score, idx = probs.max(-1)
            out += [Prediction(self.labels[i], float(s)) for i, s in zip(idx.tolist(), score.tolist())]
        return out


def load_classifier(folder: str | Path) -> TextClassifier:
    return TextClassifier(folder)
