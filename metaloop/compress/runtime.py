"""Saved classifiers of every format, loaded from disk alone, behind one interface.

A model folder holds the tokenizer, `config.json` (label names in `id2label`) and
`metaloop.json`, whose `format` says how the weights are stored:

| format       | weights                          | loads with                                        |
|--------------|----------------------------------|---------------------------------------------------|
| `hf`         | `model.safetensors`              | `AutoModelForSequenceClassification` alone        |
| `hf-pruned`  | `model.safetensors`, per-layer   | this module: the stock class, its layers resized  |
|              | head/FFN sizes in metaloop.json  | to the recorded sizes, then the safetensors       |
| `torch-int8` | `model.safetensors`: int8        | this module: stock class -> torch.ao dynamic int8 |
|              | weights + scales, fp32 the rest  | Linear modules -> the stored int8 weights         |
| `onnx`       | `model.onnx` (int8 or fp32)      | onnxruntime alone                                 |

Nothing is unpickled. `load_classifier(path)` returns a `Classifier` whatever the format.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from metaloop.adapt import SIDECAR, layers_of
from metaloop.atomic import commit_dir, fresh_tmp, write_json
from metaloop.errors import ConfigError

ONNX_FILE = "model.onnx"
WEIGHTS = "model.safetensors"


# ---------------------------------------------------------------- structure (pruned layers)


def _prune_linear(lin: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping rows (dim=0: outputs) or columns (dim=1: inputs) `index`."""
    w = lin.weight.detach().index_select(dim, index).clone()
    b = None if lin.bias is None else (lin.bias.detach().clone() if dim == 1 else lin.bias.detach()[index].clone())
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def head_size(layer: nn.Module) -> int:
    return int(layer.attention.self.attention_head_size)


def n_heads(layer: nn.Module) -> int:
    return layer.attention.self.query.out_features // head_size(layer)


def remove_heads(layer: nn.Module, keep: Sequence[int]) -> None:
    """Physically keep only attention heads `keep` of one BERT-like layer."""
    att = layer.attention.self
    size = head_size(layer)
    keep = sorted(int(h) for h in keep)
    if not keep:
        raise ValueError("a layer must keep at least one attention head")
    idx = torch.cat([torch.arange(h * size, (h + 1) * size) for h in keep])
    for name in ("query", "key", "value"):
        setattr(att, name, _prune_linear(getattr(att, name), idx, 0))
    layer.attention.output.dense = _prune_linear(layer.attention.output.dense, idx, 1)
    att.num_attention_heads = len(keep)
    att.all_head_size = len(keep) * size


def remove_neurons(layer: nn.Module, keep: Sequence[int]) -> None:
    """Physically keep only FFN neurons `keep` of one BERT-like layer."""
    keep = sorted(int(i) for i in keep)
    if not keep:
        raise ValueError("a layer must keep at least one FFN neuron")
    idx = torch.tensor(keep)
    layer.intermediate.dense = _prune_linear(layer.intermediate.dense, idx, 0)
    layer.output.dense = _prune_linear(layer.output.dense, idx, 1)


def structure_of(model: nn.Module) -> dict | None:
    """Per-layer head counts and FFN widths, or None when they are the config's own."""
    cfg = model.config
    layers = layers_of(model)
    heads = [n_heads(layer) for layer in layers]
    ffn = [layer.intermediate.dense.out_features for layer in layers]
    if all(h == cfg.num_attention_heads for h in heads) and all(i == cfg.intermediate_size for i in ffn):
        return None
    return {"heads": heads, "intermediate": ffn}


def apply_structure(model: nn.Module, structure: dict | None) -> None:
    """Resize a freshly built model's layers to `structure` (weights are loaded afterwards)."""
    if not structure:
        return
    layers = layers_of(model)
    if len(structure["heads"]) != len(layers) or len(structure["intermediate"]) != len(layers):
        raise ConfigError(f"structure has {len(structure['heads'])} layers, the model {len(layers)}")
    for layer, h, i in zip(layers, structure["heads"], structure["intermediate"]):
        if h != n_heads(layer):
            remove_heads(layer, range(h))
        if i != layer.intermediate.dense.out_features:
            remove_neurons(layer, range(i))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- torch folders


def read_sidecar(path: str | Path) -> dict:
    f = Path(path) / SIDECAR
    if not f.is_file():
        return {"format": "hf"}
    return json.loads(f.read_text(encoding="utf-8"))


def save_torch(model: nn.Module, tokenizer, out_dir: str | Path, info: dict) -> Path:
    """Save an fp32 (possibly pruned) classifier: `hf` when stock-shaped, else `hf-pruned`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = fresh_tmp(out)
    structure = structure_of(model)
    model.config.save_pretrained(tmp)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    write_json(tmp / SIDECAR, {**info, "format": "hf-pruned" if structure else "hf", "structure": structure})
    commit_dir(tmp, out)
    return out


def build_skeleton(path: str | Path, structure: dict | None = None) -> nn.Module:
    """The stock model class from `path`'s config (or a `CentroidClassifier` where the config
    says so), resized to `structure`, weights uninitialised."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from metaloop.centroid_classifier import CentroidClassifier

    config = AutoConfig.from_pretrained(path)
    if CentroidClassifier.spec(config) is not None:
        model = CentroidClassifier.from_config(config, attn_implementation="sdpa")
    else:
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    apply_structure(model, structure)
    return model


# ---------------------------------------------------------------- torch.ao dynamic int8
# Rebuilt here, where every format is read; `quantize` writes them and imports these.


def _qconfig(per_channel: bool):
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    return per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig


def torch_int8(model: nn.Module, per_channel: bool = True) -> nn.Module:
    """A torch.ao dynamic-int8 copy of `model` (every nn.Linear)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model.eval(), {nn.Linear: _qconfig(per_channel)}, dtype=torch.qint8, inplace=False)


def qlinears(model: nn.Module) -> dict[str, nn.Module]:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, DynamicLinear)}


def load_torch_int8(path: str | Path, meta: dict) -> nn.Module:
    from safetensors.torch import load_file

    path = Path(path)
    tensors = load_file(str(path / WEIGHTS))
    model = build_skeleton(path, meta.get("structure"))
    names = set(meta["quantized"])
    prefixes = tuple(f"{n}." for n in names)
    rest = {k: v for k, v in tensors.items() if not k.startswith(prefixes)}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    params = dict(model.named_parameters())
    bad = [k for k in missing if k in params and not k.startswith(prefixes)]
    if bad or unexpected:
        raise ValueError(f"{path}: int8 weights do not fit the model (missing {bad[:5]}, unexpected {unexpected[:5]})")
    q = torch_int8(model, bool(meta.get("per_channel", True)))
    qmods = qlinears(q)
    if set(qmods) != names:
        raise ValueError(f"{path}: quantized modules differ from the saved ones")
    for name, m in qmods.items():
        ints = tensors[f"{name}.weight.int8"]
        scale = tensors[f"{name}.weight.scale"].double()
        zp = tensors[f"{name}.weight.zero_point"]
        if scale.numel() > 1 or meta.get("per_channel", True) and ints.dim() == 2 and scale.numel() == ints.shape[0]:
            w = torch._make_per_channel_quantized_tensor(ints, scale, zp, 0)
        else:
            w = torch._make_per_tensor_quantized_tensor(ints, float(scale[0]), int(zp[0]))
        m.set_weight_bias(w, tensors.get(f"{name}.bias"))
    return q.eval()


def load_torch(path: str | Path) -> tuple[nn.Module, object, dict]:
    """(model in eval mode, tokenizer, sidecar) of an `hf` / `hf-pruned` / `torch-int8` folder."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    path = Path(path)
    meta = read_sidecar(path)
    fmt = meta.get("format", "hf")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if fmt == "torch-int8":
        return load_torch_int8(path, meta), tokenizer, meta
    if fmt not in ("hf", "hf-pruned"):
        raise ConfigError(f"{path}: format {fmt!r} is not a torch model folder")
    model = build_skeleton(path, meta.get("structure"))
    state = load_file(str(path / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # buffers such as position_ids may be absent from older files; parameters may not
    missing_params = [k for k in missing if k in dict(model.named_parameters())]
    if missing_params or unexpected:
        raise ConfigError(f"{path}: weights do not fit the model (missing {missing_params[:5]}, "
                          f"unexpected {unexpected[:5]})")
    return model.eval(), tokenizer, meta


# ---------------------------------------------------------------- one interface


class Classifier:
    """A loaded classifier: `predict(texts)`, `logits(encoded)`, `encode(texts)`."""

    kind = "base"

    def __init__(self, path: Path, tokenizer, labels: list[str], meta: dict, max_length: int):
        self.path, self.tokenizer, self.labels, self.meta = path, tokenizer, labels, meta
        self.max_length = max_length

    def encode(self, texts: Sequence[str], pad_to: int | None = None) -> dict[str, np.ndarray]:
        enc = self.tokenizer(
            list(texts), truncation=True, max_length=pad_to or self.max_length,
            padding="max_length" if pad_to else True, return_tensors="np",
        )
        return {k: enc[k].astype(np.int64) for k in self.input_names}

    @property
    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask"]
        if "token_type_ids" in getattr(self.tokenizer, "model_input_names", []):
            names.append("token_type_ids")
        return names

    def logits(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def predict_ids(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        out = [self.logits(self.encode(texts[i : i + batch_size])).argmax(-1) for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[str]:
        return [self.labels[i] for i in self.predict_ids(list(texts), batch_size)]

    @property
    def n_params(self) -> int | None:
        return None


class TorchClassifier(Classifier):
    kind = "torch"

    def __init__(self, path: Path, model: nn.Module, tokenizer, meta: dict, max_length: int):
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        super().__init__(path, tokenizer, labels, meta, max_length)
        self.model = model.eval()

    @property
    def input_names(self) -> list[str]:
        names = super().input_names
        if "token_type_ids" in names and getattr(self.model.config, "type_vocab_size", 0) == 0:
            names.remove("token_type_ids")
        return names

    def logits(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return self.model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.float().numpy()

    @property
    def n_params(self) -> int | None:
        total = 0
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        for m in self.model.modules():
            if isinstance(m, DynamicLinear):  # its int8 weights are not parameters
                w, b = m._weight_bias()
                total += w.numel() + (b.numel() if b is not None else 0)
        return total + count_params(self.model)


class OnnxClassifier(Classifier):
    kind = "onnx"

    def __init__(self, path: Path, tokenizer, meta: dict, max_length: int, threads: int | None):
        import onnxruntime as ort
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        labels = [config.id2label[i] for i in range(config.num_labels)]
        super().__init__(path, tokenizer, labels, meta, max_length)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path / ONNX_FILE), opts, providers=["CPUExecutionProvider"])
        self._inputs = [i.name for i in self.session.get_inputs()]

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    def logits(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {k: inputs[k] for k in self._inputs})[0]

    @property
    def n_params(self) -> int | None:
        return self.meta.get("params")


def load_classifier(path: str | Path, *, threads: int | None = None, max_length: int | None = None) -> Classifier:
    """Load any model folder written by adaptation or compression (from disk alone)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: not a model folder (no config.json)")
    meta = read_sidecar(path)
    max_length = max_length or int(meta.get("max_length", 64))
    if meta.get("format") == "onnx":
        return OnnxClassifier(path, AutoTokenizer.from_pretrained(path), meta, max_length, threads)
    model, tokenizer, meta = load_torch(path)
    return TorchClassifier(path, model, tokenizer, meta, max_length)
