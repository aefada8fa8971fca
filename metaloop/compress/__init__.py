"""Compression recipes for an adapted domain classifier: composable steps chosen in params.

    params = CompressParams()                      # recipes: {"int8": [int8], "small": [...]}
    result = compress(teacher_dir, out_dir, "small", params, train=examples, val=held_out)
    clf = load_classifier(result.model_dir)        # any format, from disk alone
    clf.predict(["where is my parcel"])

A recipe is an ordered list of steps applied to one in-memory model; `int8` (which changes
the storage format) may only come last:

| step         | what it does                                                                  |
|--------------|-------------------------------------------------------------------------------|
| `distill`    | student with `distill.layers` of the teacher's layers, trained on its logits  |
| `prune`      | Taylor-importance head and FFN-neuron pruning, units physically removed,      |
|              | then distillation from the teacher to recover                                 |
| `trim_vocab` | keep the embedding rows of the tokens the domain uses (+ character fallback)  |
| `int8`       | int8 weights: ONNX Runtime (default) or torch.ao dynamic quantization         |

The teacher of every training step is the input (uncompressed adapted) model. The result
records the student's agreement with the teacher on the training texts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metaloop.adapt import Examples, predict_logits, seeded
from metaloop.compress.runtime import (
    Classifier,
    OnnxClassifier,
    TorchClassifier,
    count_params,
    load_classifier,
    load_torch,
    save_torch,
    structure_of,
)
from metaloop.errors import ConfigError

from metaloop.stage_params import (  # noqa: F401 (re-exported: the settings live torch-free)
    STEPS,
    CompressParams,
    DistillParams,
    Int8Params,
    KDTraining,
    PruneParams,
    Step,
    VocabParams,
)

__all__ = [
    "Classifier",
    "CompressParams",
    "CompressResult",
    "DistillParams",
    "Int8Params",
    "OnnxClassifier",
    "PruneParams",
    "TorchClassifier",
    "VocabParams",
    "compress",
    "compress_recipes",
    "load_classifier",
]


@dataclass
class CompressResult:
    recipe: str
    steps: list[str]
    model_dir: str
    format: str
    params_before: int
    params_after: int
    agreement_train: float  # share of training texts where the compressed model's label = teacher's
    seconds: float
    details: dict = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        return {"params": float(self.params_after), "agreement_train": 100.0 * self.agreement_train,
                "compress_seconds": self.seconds}


def _kd_kwargs(p: KDTraining) -> dict:
    return {"epochs": p.epochs, "batch_size": p.batch_size, "lr": p.lr, "temperature": p.temperature,
            "alpha": p.alpha, "hidden_weight": p.hidden_weight, "augment": p.augment, "patience": p.patience}


def compress(
    teacher_dir: str | Path,
    out_dir: str | Path,
    recipe: str | Sequence[str],
    params: CompressParams,
    *,
    train: Examples,
    val: Examples | None = None,
    unlabeled: Sequence[str] = (),
    max_length: int = 64,
    seed: int = 13,
) -> CompressResult:
    """Apply a recipe (name or step list) to the classifier in `teacher_dir`; save to `out_dir`.

    `train` are the domain's labelled examples (the teacher's own training rows), `val` an
    optional held-out slice for early stopping, `unlabeled` optional in-domain texts that
    only the distillation term uses.
    """
    from metaloop.compress.distill import kd_fit, make_student
    from metaloop.compress.prune import importance, prune, relative, schedule, units
    from metaloop.compress.quantize import onnx_int8, save_torch_int8
    from metaloop.compress.vocab import trim_vocab

    steps = params.steps(recipe)
    name = recipe if isinstance(recipe, str) else "+".join(steps)
    t0 = time.perf_counter()
    details: dict = {}
    with seeded(seed, params.threads):  # alone: see metaloop.adapt.seeded
        teacher, t_tok, t_meta = load_torch(teacher_dir)
        labels = [teacher.config.id2label[i] for i in range(teacher.config.num_labels)]
        unknown = sorted(set(train.labels) - set(labels))
        if unknown:
            raise ConfigError(f"compress: training labels {unknown} are not labels of the teacher {teacher_dir}")
        max_length = int(t_meta.get("max_length", max_length))
        model, tok = load_torch(teacher_dir)[:2]  # the working copy
        before = count_params(model)
        kd_texts = [*train.texts, *unlabeled]
        for step in steps:
            if step == "distill":
                p = params.distill
                model, picked = make_student(model, p.layers)
                hist = kd_fit(model, tok, teacher, t_tok, train, labels, unlabeled=unlabeled, val=val,
                              teacher_layers=picked, max_length=max_length, seed=seed, **_kd_kwargs(p))
                details["distill"] = {"layers": picked, "epochs_run": hist.epochs_run, "best_epoch": hist.best_epoch}
            elif step == "prune":
                p = params.prune
                h0, f0 = units(model)
                rounds = []
                for r, (hk, fk) in enumerate(zip(schedule(p.heads_keep, p.rounds), schedule(p.ffn_keep, p.rounds))):
                    h, f = units(model)
                    scores = importance(model, tok, train, labels, max_length)
                    info = prune(model, scores, heads_keep=relative(hk, h, h0), ffn_keep=relative(fk, f, f0),
                                 scope=p.scope)
                    hist = kd_fit(model, tok, teacher, t_tok, train, labels, unlabeled=unlabeled, val=val,
                                  max_length=max_length, seed=seed + r, **{**_kd_kwargs(p), "hidden_weight": 0.0})
                    rounds.append({**info, "epochs_run": hist.epochs_run})
                details["prune"] = {"rounds": rounds, "structure": structure_of(model)}
            elif step == "trim_vocab":
                p = params.trim_vocab
                texts = kd_texts + (list(val.texts) if val is not None else [])
                model, tok, info = trim_vocab(model, tok, texts, keep_chars=p.keep_chars,
                                              keep_frequent=p.keep_frequent, max_positions=p.max_positions)
                details["trim_vocab"] = info
        after = count_params(model)
        info = {"recipe": name, "steps": steps, "teacher": str(teacher_dir), "domain": t_meta.get("domain"),
                "max_length": max_length, "details": details, "seed": seed}
        out = Path(out_dir)
        if steps[-1] == "int8":
            if params.int8.backend == "onnx":
                onnx_int8(model, tok, out, info, optimize=params.int8.optimize, per_channel=params.int8.per_channel)
            else:
                save_torch_int8(model, tok, out, info, per_channel=params.int8.per_channel)
        else:
            save_torch(model, tok, out, info)
        # agreement with the teacher, measured on the saved folder as loaded from disk
        clf = load_classifier(out, max_length=max_length)
        teacher_ids = predict_logits(teacher, t_tok, train.texts, max_length).argmax(-1).numpy()
        agree = float(np.mean(clf.predict_ids(train.texts) == teacher_ids)) if len(train) else 1.0
    result = CompressResult(
        recipe=name, steps=steps, model_dir=str(out), format=clf.meta.get("format", "hf"),
        params_before=before, params_after=after, agreement_train=agree,
        seconds=round(time.perf_counter() - t0, 3), details=details,
    )
    if agree < params.agreement_min:
        raise ConfigError(
            f"compress: recipe {name!r} agrees with its teacher on {100 * agree:.1f}% of training texts, "
            f"below compress.agreement_min={100 * params.agreement_min:.1f}%"
        )
    return result


def compress_recipes(
    teacher_dir: str | Path,
    out_root: str | Path,
    params: CompressParams,
    *,
    train: Examples,
    val: Examples | None = None,
    unlabeled: Sequence[str] = (),
    recipes: Sequence[str] | None = None,
    max_length: int = 64,
    seed: int = 13,
) -> dict[str, CompressResult]:
    """Every named recipe (or those in `recipes`) of one domain -> out_root / recipe."""
    out = {}
    for name in recipes or list(params.recipes):
        out[name] = compress(teacher_dir, Path(out_root) / name, name, params, train=train, val=val,
                             unlabeled=unlabeled, max_length=max_length, seed=seed)
    return out
