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
    def __init__(self, folder: str | Path, threads: int | None = None, batch_size: int = 32):
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
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        pad = config.get("pad_token_id", 0)
        self.tokenizer.enable_padding(pad_id=pad, pad_token=self.tokenizer.id_to_token(pad) or "[PAD]")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(folder / ONNX_FILE), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        enc = self.tokenizer.encode_batch(list(texts))
        arrays = {"input_ids": [e.ids for e in enc], "attention_mask": [e.attention_mask for e in enc],
                  "token_type_ids": [e.type_ids for e in enc]}
        return {k: np.asarray(arrays[k], dtype=np.int64) for k in self.inputs}

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        return self.session.run(None, self.encode(texts))[0]

    def predict(self, texts: Sequence[str], top_k: int = 1) -> list[list[tuple[str, float]]]:
        """Per text, the `top_k` (label, probability) pairs, most likely first."""
        out: list[list[tuple[str, float]]] = []
        k = max(1, min(top_k, len(self.labels)))
        for start in range(0, len(texts), self.batch_size):
            logits = self.logits(texts[start : start + self.batch_size])
            z = np.exp(logits - logits.max(-1, keepdims=True))
            probs = z / z.sum(-1, keepdims=True)
            for p in probs:
                best = np.argsort(-p, kind="stable")[:k]
                out.append([(self.labels[i], float(p[i])) for i in best])
        return out
