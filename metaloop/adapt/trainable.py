"""Which parameters fine-tuning updates, and how fast: the strategy (`full`, `top_k`,
`head`, `lora`), LoRA adapters (meta-learned A matrices when the init has them) and the
learned per-parameter learning rates of a Meta-SGD init.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import torch
from torch import nn

from metaloop.errors import ConfigError
from metaloop.stage_params import AdaptParams
from metaloop.adapt.features import head_modules, layers_of
from metaloop.adapt.folder import HEAD_KEYS, LORA_ADAPTER, normalise_key, resolve_init

log = logging.getLogger("metaloop.adapt")


def set_trainable(model: nn.Module, params: AdaptParams) -> None:
    head = head_modules(model)
    for name, p in model.named_parameters():
        in_head = any(name.startswith(h + ".") for h in head)
        if params.strategy == "full":
            p.requires_grad_(True)
        elif params.strategy == "head":
            p.requires_grad_(in_head)
        elif params.strategy == "top_k":
            n_layers = len(layers_of(model))
            if params.top_k > n_layers:
                raise ConfigError(f"adapt.top_k={params.top_k} but the encoder has {n_layers} layers")
            idx = _layer_index(name)
            p.requires_grad_(in_head or (idx is not None and idx >= n_layers - params.top_k))
        else:  # lora: peft decides (adapters + modules_to_save)
            pass


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for a, b in itertools.pairwise(parts):
        if a == "layer" and b.isdigit():
            return int(b)
    return None


def add_lora(model: nn.Module, params: AdaptParams, init: str | Path) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=params.lora_rank,
        lora_alpha=params.lora_alpha or 2 * params.lora_rank,
        lora_dropout=0.0,
        target_modules=params.lora_targets,
        modules_to_save=head_modules(model),
    )
    try:
        wrapped = get_peft_model(model, cfg)
    except ValueError as err:
        raise ConfigError(f"adapt.strategy=lora: peft cannot place adapters ({err}); set adapt.lora_targets") from None
    adapter = Path(resolve_init(init)) / LORA_ADAPTER
    if (adapter / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        prefix = model.base_model_prefix
        saved = {normalise_key(k, prefix).replace(".weight", ""): v for k, v in
                 load_file(str(adapter / "adapter_model.safetensors")).items()}
        loaded = 0
        with torch.no_grad():
            for name, p in wrapped.named_parameters():
                key = normalise_key(name, prefix).replace(".weight", "")
                if ".lora_A" in name and key in saved and saved[key].shape == p.shape:
                    p.copy_(saved[key])
                    loaded += 1
        log.info("adapt: %d LoRA A matrices initialised from %s", loaded, adapter)
    return wrapped


def learned_lr_map(
    model: nn.Module, lrs: dict[str, torch.Tensor], scale: float, head_name: str, prefix: str
) -> dict[nn.Parameter, torch.Tensor]:
    """Trainable parameter -> its learned step sizes (broadcastable to it).

    Encoder keys match by name (any peft/model prefix ignored); `head.weight` ([d], shared
    by every class row) and `head.bias` go to the classifier's final linear layer `head_name`.
    """
    norm = {normalise_key(k, prefix): v for k, v in lrs.items() if k not in HEAD_KEYS}
    norm[f"{head_name}.weight"] = lrs.get("head.weight")
    norm[f"{head_name}.bias"] = lrs.get("head.bias")
    out: dict[nn.Parameter, torch.Tensor] = {}
    for name, p in model.named_parameters():
        lr = norm.get(normalise_key(name, prefix))
        if lr is None or not p.requires_grad or "original_module" in name:
            continue
        if lr.dim() == 1 and p.dim() == 2 and normalise_key(name, prefix) == f"{head_name}.weight":
            lr = lr.unsqueeze(0)  # [d] step sizes shared by every class row
        try:
            if torch.broadcast_shapes(lr.shape, p.shape) == p.shape:
                out[p] = lr.float() * scale
        except RuntimeError:
            log.warning("adapt: learned step sizes for %s have shape %s, not %s; ignored",
                        name, tuple(lr.shape), tuple(p.shape))
    return out
