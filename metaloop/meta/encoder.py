"""The encoder as a function of its parameters.

`Encoder(model, pooling)` wraps a Hugging Face `AutoModel` (or a peft-wrapped one). Calling
it with `params` runs the model through `torch.func.functional_call`, substituting those
tensors for the module's own parameters for that call only: fast weights of an inner loop
are plain tensors in a dict, the module is never copied or patched, and its parameters stay
ordinary `nn.Parameter`s for the outer optimizer and the gradient all-reduce. Parameters
missing from `params` are the module's own.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from metaloop.errors import ConfigError
from metaloop.meta.pooling import pool

Params = dict[str, torch.Tensor]
_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


class Encoder(nn.Module):
    """`forward(inputs, params)` -> pooled embeddings, the encoder's weights swapped for `params`.

    For BERT-family encoders (`embeddings` + `encoder.layer`, also under a peft wrapper) the
    layers can also run one at a time, which buys two things:

    * `prefix(inputs, upto)` runs the embeddings and layers below `upto` once; passing it
      as `forward(..., prefix=...)` runs only the layers above. When the inner loop adapts
      only upper layers, the lower ones are computed once per episode, not once per step.
    * `checkpointing=True` recomputes each layer's activations in the backward pass instead
      of storing them (non-reentrant `torch.utils.checkpoint`; fast weights are passed to the
      checkpointed function explicitly, so the recomputation uses the same weights).

    `length_groups=g > 1` runs a right-padded set as up to g groups of similar length, each
    cut to its own longest row (`length_groups`): a set of short texts padded to its one long
    outlier then costs what its real tokens cost. Padding never changes a real token's output
    (it is masked), so the embeddings are the same; only the work drops.
    """

    def __init__(self, model: nn.Module, pooling: str = "mean", checkpointing: bool = False,
                 length_groups: int = 1):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.checkpointing = checkpointing
        self.length_groups = length_groups
        self._stack = _find_stack(model)  # (name prefix, core model) or None

    @property
    def layerwise(self) -> bool:
        return self._stack is not None

    @property
    def _checkpoint_layers(self) -> bool:
        return self.checkpointing and self.layerwise

    def forward(self, inputs: dict[str, torch.Tensor], params: Params | None = None,
                prefix: Prefix | None = None) -> torch.Tensor:
        """Pooled embeddings [B, d] (fp32 even under bf16 autocast) of tokenized `inputs`."""
        if isinstance(prefix, GroupedPrefix):
            groups, prefixes = prefix.groups, prefix.parts
        else:
            groups = length_groups(inputs.get("attention_mask"), self.length_groups) if prefix is None else None
            prefixes = [None] * len(groups or [])
        with _cpu_attention(inputs):
            if groups is None:
                return self._forward(inputs, params, prefix)
            parts = [self._forward(_rows(inputs, group), params, p) for group, p in zip(groups, prefixes)]
        order = torch.cat([rows for rows, _ in groups])
        return torch.cat(parts)[torch.argsort(order)]  # back to the input order

    def _forward(self, inputs, params, prefix) -> torch.Tensor:
        if prefix is not None or self._checkpoint_layers:
            start = prefix or self._embed(inputs, params or {})
            hidden = self._layers(start, params or {})
        elif params:
            hidden = functional_call(self.model, params, args=(), kwargs=dict(inputs)).last_hidden_state
        else:
            hidden = self.model(**inputs).last_hidden_state
        z = pool(hidden, inputs.get("attention_mask"), self.pooling)
        return z.float() if z.dtype in (torch.bfloat16, torch.float16) else z

    def named_weights(self) -> dict[str, nn.Parameter]:
        """Parameters by the names `forward(params=...)` expects."""
        return dict(self.model.named_parameters())

    def prefix(self, inputs: dict[str, torch.Tensor], upto: int) -> Prefix | GroupedPrefix:
        """Hidden states after the embeddings and layers [0, upto), at the module's own weights
        (one per length group when `length_groups` splits the set)."""
        groups = length_groups(inputs.get("attention_mask"), self.length_groups)
        with _cpu_attention(inputs):
            if groups is None:
                return self._layers(self._embed(inputs, {}), {}, stop=upto)
            return GroupedPrefix(groups, [self._layers(self._embed(_rows(inputs, g), {}), {}, stop=upto)
                                          for g in groups])

    def split_point(self, names: list[str]) -> int:
        """Lowest layer any of `names` lives in (0: no frozen prefix to compute once)."""
        if not self.layerwise or not names:
            return 0
        idx = [layer_index(n) for n in names]
        return 0 if None in idx else min(idx)

    # ---- layer by layer (BERT family)
    def _embed(self, inputs, params) -> Prefix:
        name, core = self._stack
        emb_args = {k: v for k, v in inputs.items() if k in ("input_ids", "token_type_ids")}
        mine = _sub(params, f"{name}embeddings.")
        hidden = functional_call(core.embeddings, mine, args=(), kwargs=emb_args) if mine else core.embeddings(**emb_args)
        return Prefix(hidden, _attention_mask(core, hidden, inputs.get("attention_mask")), 0)

    def _layers(self, start: Prefix, params: Params, stop: int | None = None) -> Prefix | torch.Tensor:
        name, core = self._stack
        layers = core.encoder.layer
        hidden = start.hidden
        for i in range(start.start, len(layers) if stop is None else stop):
            hidden = _run_layer(layers[i], hidden, start.mask, _sub(params, f"{name}encoder.layer.{i}."),
                                self._checkpoint_layers and torch.is_grad_enabled())
        return hidden if stop is None else Prefix(hidden, start.mask, stop)


class Prefix:
    """Hidden states entering layer `start`, with the attention mask the layers take."""

    def __init__(self, hidden: torch.Tensor, mask, start: int):
        self.hidden, self.mask, self.start = hidden, mask, start

    def tensors(self) -> list[torch.Tensor]:
        return [self.hidden]

    def with_tensors(self, hidden: list[torch.Tensor]) -> Prefix:
        return Prefix(hidden[0], self.mask, self.start)


class GroupedPrefix:
    """One `Prefix` per length group (`groups` as `length_groups` returns them)."""

    def __init__(self, groups: list[tuple[torch.Tensor, int]], parts: list[Prefix]):
        self.groups, self.parts = groups, parts

    def tensors(self) -> list[torch.Tensor]:
        return [p.hidden for p in self.parts]

    def with_tensors(self, hidden: list[torch.Tensor]) -> GroupedPrefix:
        return GroupedPrefix(self.groups, [p.with_tensors([h]) for p, h in zip(self.parts, hidden)])


def _rows(inputs: dict[str, torch.Tensor], group: tuple[torch.Tensor, int]) -> dict[str, torch.Tensor]:
    rows, width = group
    return {k: v[rows, :width] for k, v in inputs.items()}


def _sub(params: Params, prefix: str) -> Params:
    return {n[len(prefix):]: t for n, t in params.items() if n.startswith(prefix)}


def _find_stack(model: nn.Module):
    for name, module in [("", model), *model.named_modules()]:
        enc = getattr(module, "encoder", None)
        if hasattr(module, "embeddings") and isinstance(getattr(enc, "layer", None), nn.ModuleList):
            return (f"{name}." if name else ""), module
    return None


def _attention_mask(core, hidden, mask):
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers 4.x
        return None if mask is None else core.get_extended_attention_mask(mask, mask.shape)
    return create_bidirectional_mask(config=core.config, inputs_embeds=hidden, attention_mask=mask)


def _sdpa_backends() -> list:
    flags = torch.backends.cuda
    on = [(SDPBackend.FLASH_ATTENTION, flags.flash_sdp_enabled()),
          (SDPBackend.EFFICIENT_ATTENTION, flags.mem_efficient_sdp_enabled()),
          (SDPBackend.CUDNN_ATTENTION, flags.cudnn_sdp_enabled()), (SDPBackend.MATH, flags.math_sdp_enabled())]
    return [backend for backend, enabled in on if enabled]


def _run_layer(layer, hidden, mask, fast: Params, checkpointed: bool):
    names = list(fast)
    # A recomputation must pick the attention kernel the forward picked, even when it runs in
    # a backward pass outside the forward's `attention_for` context.
    backends = _sdpa_backends() if checkpointed else None

    def fn(h, *tensors):
        with sdpa_kernel(backends) if backends else contextlib.nullcontext():
            out = functional_call(layer, dict(zip(names, tensors)), (h,), {"attention_mask": mask})
        return out[0] if isinstance(out, tuple) else out

    if checkpointed:
        return checkpoint(fn, hidden, *fast.values(), use_reentrant=False)
    return fn(hidden, *fast.values())


def _cpu_attention(inputs: dict[str, torch.Tensor]):
    """On CPU the composite (math) attention beats the fused CPU kernel for the short
    sequences of few-shot text (measured on MiniLM: ~1.3x in bf16, forward + backward)."""
    ids = inputs.get("input_ids")
    on_cpu = ids is not None and ids.device.type == "cpu"
    return sdpa_kernel([SDPBackend.MATH]) if on_cpu else contextlib.nullcontext()


def attention_for(create_graph: bool):
    """Fused SDPA kernels have no double backward; second-order steps use the math kernel."""
    return sdpa_kernel([SDPBackend.MATH]) if create_graph else contextlib.nullcontext()


def length_groups(mask: torch.Tensor | None, groups: int) -> list[tuple[torch.Tensor, int]] | None:
    """(row indices, width) of up to `groups` groups of rows sorted by length, each as wide as
    its longest row; None when one group it is (groups <= 1, no or left padding, or a split
    would save under 10% of the padded tokens)."""
    if groups <= 1 or mask is None or mask.dim() != 2 or mask.shape[0] < 2 * groups:
        return None
    lengths = mask.sum(1)
    right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all()) and bool((lengths > 0).all())
    if not right_padded:
        return None
    order = torch.argsort(lengths, stable=True)
    split = [(rows, int(lengths[rows].max())) for rows in order.tensor_split(groups)]
    if sum(len(rows) * width for rows, width in split) > 0.9 * mask.numel():
        return None
    return split


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def adapt_names(encoder: Encoder, scope: str, top_k: int = 2) -> list[str]:
    """Encoder parameters the inner loop adapts under `scope` (the head always adapts).

    all: every parameter (frozen and unused ones too: they adapt, get zero gradients where
    unused, and receive no meta-gradient where frozen); top_k: those of the top `top_k`
    Transformer layers; head: none; lora: the LoRA matrices (see `add_lora`).
    """
    names = list(encoder.named_weights())
    if scope == "all":
        return names
    if scope == "head":
        return []
    if scope == "lora":
        picked = [n for n in names if ".lora_A." in n or ".lora_B." in n]
        if not picked:
            raise ConfigError("meta.adapt=lora but the encoder has no LoRA adapters (add_lora was not applied)")
        return picked
    if scope == "top_k":
        depth = {layer_index(n) for n in names} - {None}
        if not depth:
            raise ConfigError("meta.adapt=top_k: cannot find numbered layers in the backbone; use all, head or lora")
        n_layers = max(depth) + 1
        if top_k > n_layers:
            raise ConfigError(f"meta.top_k={top_k} but the backbone has {n_layers} layers; lower meta.top_k")
        return [n for n in names if (layer_index(n) or -1) >= n_layers - top_k]
    raise ConfigError(f"meta.adapt={scope!r}: allowed all, top_k, head, lora")


def add_lora(model: nn.Module, rank: int, targets: list[str] | None = None) -> nn.Module:
    """Wrap `model` with peft LoRA adapters for the inner loop.

    Every base weight stays meta-trainable (peft freezes them; we undo that); `lora_A` is
    meta-learned; `lora_B` starts at zero in every episode and is not meta-learned, so the
    encoder with its adapters equals the base encoder and the saved base model *is* the
    meta-learned initialisation (the adapter initialisation is saved beside it).
    """
    from peft import LoraConfig, get_peft_model  # heavy import, only when asked for

    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets)
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(
            f"meta.adapt=lora: peft cannot place adapters on this backbone ({err}); "
            "set meta.lora_targets to module names of the backbone (e.g. [query, value])"
        ) from None
    for name, p in wrapped.named_parameters():
        p.requires_grad_(".lora_B." not in name)
    return wrapped
