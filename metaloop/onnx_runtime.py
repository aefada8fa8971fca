"""Serve an ONNX classifier folder with numpy, onnxruntime and tokenizers alone.

No torch, no transformers, no other metaloop module: this file is what a registered int8
model carries to a serving host (MLflow `code_paths`), so its environment is three small
packages. It reads what compression wrote: `model.onnx`, `tokenizer.json`, `config.json`
(label names) and `metaloop.json` (max_length).

    clf = OnnxTextClassifier("artifacts/adapted/hospitality/int8")
    clf.predict(["can I keep the room until 2pm?"], top_k=2)
    # [[("late_checkout", 0.93), ("checkout", 0.04)]]

Tokenisation is the tokenizer.json that `transformers` wrote, applied by the same Rust
library `transformers`' fast tokenizer wraps, with the same truncation and padding: the
logits equal `metaloop.compress.runtime.OnnxClassifier`'s (tests/model/test_serving.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

ONNX_FILE, SIDECAR, TOKENIZER = "model.onnx", "metaloop.json", "tokenizer.json"


def is_onnx_folder(folder: str | Path) -> bool:
    f = Path(folder) / SIDECAR
    return f.is_file() and json.loads(f.read_text(encoding="utf-8")).get("format") == "onnx"


class OnnxTextClassifier:
    def __init__(self, folder: str | Path, threads: int | None = None, batch_size: int = 8):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        folder = Path(folder)
        for name in (ONNX_FILE, TOKENIZER, "config.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder}: no {name}; not an ONNX classifier folder written by "
                                        "metaloop's int8 compression")
        meta = json.loads((folder / SIDECAR).read_text(encoding="utf-8")) if (folder / SIDECAR).is_file() else {}
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        self.labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
        self.max_length, self.batch_size = int(meta.get("max_length", 64)), batch_size
        self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER))
        self.tokenizer.no_padding()  # padded here, per length-sorted chunk (`predict`)
        self.tokenizer.enable_truncation(self.max_length)
        self.pad_id = int(config.get("pad_token_id", 0))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(folder / ONNX_FILE), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The model's inputs for `texts`, padded to the longest (as `transformers` pads)."""
        return self._arrays(self.tokenizer.encode_batch(list(texts)))

    def _arrays(self, encodings) -> dict[str, np.ndarray]:
        width = max(len(e.ids) for e in encodings)
        out = {k: np.zeros((len(encodings), width), dtype=np.int64) for k in ("input_ids", "attention_mask",
                                                                              "token_type_ids")}
        out["input_ids"].fill(self.pad_id)
        for i, e in enumerate(encodings):
            n = len(e.ids)
            out["input_ids"][i, :n], out["attention_mask"][i, :n], out["token_type_ids"][i, :n] = (
                e.ids, e.attention_mask, e.type_ids)
        return {k: out[k] for k in self.inputs}

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        return self.session.run(None, self.encode(texts))[0]

    def predict(self, texts: Sequence[str], top_k: int = 1) -> list[list[tuple[str, float]]]:
        """Per text, the `top_k` (label, probability) pairs, most likely first.

        Texts are tokenised once, sorted by length and run in chunks of `batch_size` (8), each
        padded to its own longest: a batch of mixed lengths then costs about the tokens it has,
        not rows x the longest row (half the time on the packaged domains' test rows at batch
        32; bench/serving.py). The answers come back in the caller's order."""
        k = max(1, min(top_k, len(self.labels)))
        encodings = self.tokenizer.encode_batch(list(texts))
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        out: list[list[tuple[str, float]]] = [[] for _ in encodings]
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            logits = self.session.run(None, self._arrays([encodings[i] for i in chunk]))[0]
            z = np.exp(logits - logits.max(-1, keepdims=True))
            probs = z / z.sum(-1, keepdims=True)
            for i, p in zip(chunk, probs):
                best = np.argsort(-p, kind="stable")[:k]
                out[i] = [(self.labels[j], float(p[j])) for j in best]
        return out
