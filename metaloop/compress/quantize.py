"""int8 quantization, two backends measured against each other (see docs/compression.md).

* `onnx` (the default): the fp32 model is exported with `torch.onnx.export`, optionally
  fused by onnxruntime's transformer optimizer, then `onnxruntime.quantization.quantize_dynamic`
  stores int8 weights for every MatMul *and* the embedding Gathers. The folder holds
  `model.onnx` beside the tokenizer and config and runs with onnxruntime alone.
* `torch`: `torch.ao.quantization.quantize_dynamic` (int8 weights, activations quantized on
  the fly) on every `nn.Linear`. The int8 weights and their scales are written as plain
  tensors to safetensors and put back into freshly quantized modules on load, so no pickled
  module is ever read. Embeddings stay fp32.

torchao's int8 dynamic-activation/int8-weight path was measured too (slower than both on
this CPU, and its tensor subclasses do not save without pickling), so it is not a backend.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

from metaloop.adapt import SIDECAR
from metaloop.atomic import commit_dir, fresh_tmp, write_json
from metaloop.compress.runtime import ONNX_FILE, WEIGHTS, count_params, qlinears, structure_of, torch_int8

log = logging.getLogger("metaloop.compress")


# ---------------------------------------------------------------- ONNX Runtime


_EXPORT_LOCK = threading.Lock()


def export_onnx(model: nn.Module, tokenizer, path: str | Path, opset: int = 17) -> list[str]:
    """Export `model` (eager attention, fp32) to `path`; returns the input names."""
    model = model.eval()
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "eager" and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")  # the exporter traces plain matmul/softmax
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in tokenizer.model_input_names and getattr(model.config, "type_vocab_size", 0) > 0:
        names.append("token_type_ids")
    sample = tokenizer(["a b", "c"], padding=True, return_tensors="pt")
    args = tuple(sample[n] for n in names)

    class Logits(nn.Module):  # positional inputs -> logits only
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *xs):
            return self.inner(**dict(zip(names, xs))).logits

    try:
        # torch.onnx.export keeps global state: two domains exporting at once from the flow's
        # thread pool fail with "GLOBALS.in_onnx_export must be True". One at a time.
        with _EXPORT_LOCK, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Logits(model), args, str(path), input_names=names, output_names=["logits"],
                dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "logits": {0: "batch"}},
                opset_version=opset, dynamo=False,
            )
    finally:
        if impl and impl != "eager" and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(impl)
    return names


def onnx_int8(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    info: dict,
    *,
    optimize: bool = True,
    per_channel: bool = True,
    quantize: bool = True,
) -> Path:
    """Write an ONNX folder (int8 unless `quantize=False`) for `model`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(out_dir)
    tmp = fresh_tmp(out)
    work = Path(tempfile.mkdtemp(prefix="metaloop-onnx-"))
    try:
        fp32 = work / "fp32.onnx"
        names = export_onnx(model, tokenizer, fp32)
        src = fp32
        fused = None
        if optimize:
            try:
                from onnxruntime.transformers.optimizer import optimize_model

                for name in ("onnxruntime.transformers", "fusion_attention", "onnx_model", "fusion_base"):
                    logging.getLogger(name).setLevel(logging.ERROR)
                uniform = structure_of(model) is None
                opt = optimize_model(
                    str(fp32), model_type="bert",
                    num_heads=model.config.num_attention_heads if uniform else 0,
                    hidden_size=model.config.hidden_size if uniform else 0,
                )
                fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
                opt.save_model_to_file(str(work / "opt.onnx"))
                src = work / "opt.onnx"
            except Exception as err:  # noqa: BLE001 - fusion is a speed-up, never a requirement
                log.warning("onnxruntime transformer optimizer failed (%s); exporting unfused", err)
        if quantize:
            with _dropped_root_warning("Please consider to run pre-processing before quantization"):
                quantize_dynamic(
                    str(src), str(tmp / ONNX_FILE), weight_type=QuantType.QInt8, per_channel=per_channel,
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                )
        else:
            shutil.copy(src, tmp / ONNX_FILE)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / SIDECAR, {
        **info, "format": "onnx", "inputs": names, "int8": quantize, "fused": fused,
        "structure": structure_of(model), "params": count_params(model),
    })
    commit_dir(tmp, out)
    return out


@contextlib.contextmanager
def _dropped_root_warning(prefix: str):
    """Drop one message that a library logs on the root logger, for the duration of a call.

    quantize_dynamic logs its pre-processing advice to the root logger (every domain, every
    night) unless the model carries quant_pre_process's metadata. The advice is already
    followed: the transformer optimizer's fusion ran first, and measured on an adapted
    MiniLM, quant_pre_process on top gave the same logits (to 1e-4), size and latency.
    """

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not record.getMessage().startswith(prefix)

    drop, root = Drop(), logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


# ---------------------------------------------------------------- torch.ao dynamic int8


def save_torch_int8(fp32: nn.Module, tokenizer, out_dir: str | Path, info: dict, per_channel: bool = True) -> Path:
    """Quantize `fp32` and write its int8 weights and scales as safetensors."""
    from safetensors.torch import save_file

    q = torch_int8(fp32, per_channel)
    tensors: dict[str, torch.Tensor] = {}
    qmods = qlinears(q)
    for name, m in qmods.items():
        w, b = m._weight_bias()
        tensors[f"{name}.weight.int8"] = w.int_repr().contiguous()
        if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            tensors[f"{name}.weight.scale"] = w.q_per_channel_scales().float().contiguous()
            tensors[f"{name}.weight.zero_point"] = w.q_per_channel_zero_points().to(torch.int64).contiguous()
        else:
            tensors[f"{name}.weight.scale"] = torch.tensor([w.q_scale()], dtype=torch.float32)
            tensors[f"{name}.weight.zero_point"] = torch.tensor([w.q_zero_point()], dtype=torch.int64)
        if b is not None:
            tensors[f"{name}.bias"] = b.detach().float().contiguous()
    prefixes = tuple(f"{n}." for n in qmods)
    for k, v in fp32.state_dict().items():
        if not k.startswith(prefixes):
            tensors[k] = v.detach().contiguous().clone()
    out = Path(out_dir)
    tmp = fresh_tmp(out)
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "metaloop-torch-int8"})
    fp32.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / SIDECAR, {
        **info, "format": "torch-int8", "per_channel": per_channel, "structure": structure_of(fp32),
        "quantized": sorted(qmods), "params": count_params(fp32),
    })
    commit_dir(tmp, out)
    return out


def file_mb(path: str | Path) -> float:
    return os.path.getsize(path) / 1e6
