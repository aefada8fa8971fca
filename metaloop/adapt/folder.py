"""Classifier folders: an init loaded as a classifier for a domain's labels, and a trained
classifier saved as a standalone folder (safetensors, tokenizer, `metaloop.json`).

    model, tokenizer = load_for_classification("artifacts/meta/model", labels)
    save_classifier(model, tokenizer, "artifacts/adapted/hospitality/fp32", info)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from metaloop.errors import ConfigError
from metaloop.atomic import commit_dir, fresh_tmp, write_json


SIDECAR = "metaloop.json"  # how a model folder was made (adaptation, compression steps)
LEARNED_LRS = ("meta_sgd_lrs.safetensors", "inner_lrs.safetensors")
LORA_ADAPTER = "lora_adapter"
HEAD_KEYS = ("head.weight", "head.bias")


def resolve_init(init: str | Path) -> str:
    from metaloop.backbone import resolve

    return resolve(str(init))


def normalise_key(name: str, prefix: str) -> str:
    """Parameter name without peft/model prefixes or adapter names, for matching across wrappers."""
    for p in ("base_model.model.", f"{prefix}."):
        name = name.removeprefix(p)
    return name.replace(".modules_to_save.default.", ".").replace(".default.", ".")


def read_learned_lrs(folder: str | Path) -> dict[str, torch.Tensor] | None:
    """Meta-SGD step sizes saved beside an init (None when it carries none)."""
    from safetensors.torch import load_file

    for name in LEARNED_LRS:
        path = Path(folder) / name
        if path.is_file():
            return load_file(str(path))
    return None


def load_for_classification(init: str | Path, labels: list[str], attn_implementation: str = "sdpa", *,
                            centroids=None, pooling: str = "mean"):
    """(model, tokenizer): `init`'s encoder with a fresh `len(labels)`-way classification head.

    The head is the architecture's own (`AutoModelForSequenceClassification`), or with
    `centroids` (a `metaloop.meta.head.Centroids`) a `CentroidClassifier`: the encoder
    `pooling` its token states and those class vectors.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from metaloop.centroid_classifier import CentroidClassifier

    where = resolve_init(init)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    try:
        if centroids is not None:
            model = CentroidClassifier.from_encoder(where, labels, centroids, pooling, attn_implementation)
            return model, AutoTokenizer.from_pretrained(where)
        model = AutoModelForSequenceClassification.from_pretrained(
            where,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={lab: i for i, lab in enumerate(labels)},
            ignore_mismatched_sizes=True,
            attn_implementation=attn_implementation,
            dtype=torch.float32,
        )
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"adapt: cannot load an encoder and tokenizer from {str(init)!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0]}); give the meta-training output's model folder, a save_pretrained "
            "folder, packaged:all-MiniLM-L6-v2 or a hub id"
        ) from None
    finally:
        hf_logging.set_verbosity(level)
    model.config.problem_type = "single_label_classification"
    return model, tokenizer


def save_classifier(model: nn.Module, tokenizer, out_dir: str | Path, info: dict) -> Path:
    """Write a standalone classifier folder atomically (safetensors, tokenizer, metaloop.json)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = fresh_tmp(out)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(tmp)
    else:  # a CentroidClassifier: its config says how to rebuild it (compress.runtime.build_skeleton)
        model.config.save_pretrained(tmp)
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    write_json(tmp / SIDECAR, {"format": "hf", **info})
    commit_dir(tmp, out)
    return out
