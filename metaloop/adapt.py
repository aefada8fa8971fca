"""Per-domain adaptation: one standalone text classifier per target domain.

    params = AdaptParams(strategy="lora")
    result = adapt_domain("artifacts/meta/model", table, "hospitality", params, "artifacts/adapted/hospitality")
    outcome = adapt_domains(init, table, ["hospitality", "veterinary_clinic"], params, "artifacts/adapted")

The starting point is any encoder folder (the meta-learned initialisation exported by
`metaloop.train`, `packaged:all-MiniLM-L6-v2`, a hub id) or an existing classifier folder.
The output folder loads with `AutoModelForSequenceClassification.from_pretrained` alone:
config with `id2label`/`label2id` (labels in sorted order, as in the evaluation episodes),
`model.safetensors`, tokenizer files, and `metaloop.json` recording how it was made.

Strategies (`AdaptParams.strategy`): `full` trains every weight; `top_k` the top k
Transformer layers and the head; `head` the pooler and classifier only; `lora` peft LoRA
adapters (plus pooler and classifier), merged into the weights after training, so the
saved model has the base architecture and no peft dependency.

* Head initialisation: class centroids c_k of the training examples' pooled features give
  W_k = 2 c_k, b_k = -||c_k||^2 (the Proto-MAML head, as in `metaloop.meta.head`): before
  any step the classifier is a nearest-centroid classifier, a strong start for few shots.
* Meta-SGD: an init folder carrying `meta_sgd_lrs.safetensors` (written by
  `metaloop.meta.checkpoint.export_model`; keys are the encoder's parameter names, plus
  `head.weight` [d] and `head.bias` []) has those parameters trained by SGD with the learned
  per-element step sizes (times `learned_lr_scale`); other trainable parameters use AdamW.
  `inner_lrs.safetensors` is read too, with the same keys. A `lora_adapter/` folder beside
  the init (meta-learned LoRA A matrices) initialises the LoRA adapters.
* Early stopping: the domain's `val` rows, else a stratified `holdout_fraction` of its train
  rows, provided that slice has at least `early_stopping_min_rows` rows; the best epoch's
  weights are kept.

The standalone classifier pools with the architecture's own head (BERT: [CLS] -> dense ->
tanh), because transformers has no stock BERT classifier with mean pooling; meta-training
pools by mean. Fine-tuning bridges the two; see docs/compression.md.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from metaloop.errors import ConfigError, DataError
from metaloop.memory import freed_memory_kept
from metaloop.stage_params import AdaptParams, Strict  # noqa: F401 (re-exported)
from metaloop.atomic import commit_dir, fresh_tmp, write_json  # noqa: F401 (re-exported)

log = logging.getLogger("metaloop.adapt")


SIDECAR = "metaloop.json"  # how a model folder was made (adaptation, compression steps)
LEARNED_LRS = ("meta_sgd_lrs.safetensors", "inner_lrs.safetensors")
LORA_ADAPTER = "lora_adapter"
HEAD_KEYS = ("head.weight", "head.bias")


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class Examples:
    texts: list[str]
    labels: list[str]

    def __post_init__(self):
        if len(self.texts) != len(self.labels):
            raise ValueError("texts and labels differ in length")

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class DomainData:
    domain: str
    labels: list[str]  # sorted; index i is class i
    train: Examples
    val: Examples | None  # held-out slice for early stopping (None: too few rows)
    val_source: str  # "val split", "train holdout" or "none"


def _table(table: pd.DataFrame | str | Path) -> pd.DataFrame:
    if isinstance(table, (str, Path)):
        path = Path(table)
        if not path.is_file():
            raise DataError(f"{path}: curated dataset not found; run `metaloop curate`")
        table = pd.read_parquet(path)
    missing = {"text", "label", "domain", "split"} - set(table.columns)
    if missing:
        raise DataError(f"curated table lacks columns {sorted(missing)}; re-run `metaloop curate`")
    return table


def domain_data(
    table: pd.DataFrame | str | Path,
    domain: str,
    params: AdaptParams,
    *,
    eval_labels: Sequence[str] | None = None,
    seed: int = 13,
) -> DomainData:
    """The domain's training rows and early-stopping slice; DataError names what is wrong.

    `eval_labels`: the labels of the domain's evaluation set (its fixed evaluation episodes);
    default: the labels of its `test` rows. Training labels and evaluation labels must be the
    same set: a label only one side knows can be neither learned nor scored.
    """
    table = _table(table)
    rows = table[table["domain"] == domain]
    if rows.empty:
        known = ", ".join(sorted(map(str, table["domain"].unique())))
        raise DataError(f"domain {domain!r}: no rows in the curated dataset (domains present: {known})")
    train = rows[rows["split"] == "train"]
    by_label: dict[str, list[str]] = {}
    for text, label in zip(train["text"], train["label"]):
        by_label.setdefault(str(label), []).append(str(text))
    labels = sorted(by_label)
    if len(labels) < 2:
        raise DataError(
            f"domain {domain!r}: a classifier needs at least 2 labels with train rows, found {labels}; "
            "add examples or drop the domain from domains.target"
        )
    if eval_labels is None:
        eval_labels = sorted(set(map(str, rows.loc[rows["split"] == "test", "label"])))
    if eval_labels:
        unknown_to_eval = sorted(set(labels) - set(eval_labels))
        unknown_to_train = sorted(set(eval_labels) - set(labels))
        if unknown_to_eval or unknown_to_train:
            parts = []
            if unknown_to_eval:
                parts.append(f"labels unknown to its evaluation set: {unknown_to_eval}")
            if unknown_to_train:
                parts.append(f"evaluation labels without train rows: {unknown_to_train}")
            raise DataError(
                f"domain {domain!r}: " + "; ".join(parts)
                + ". Rebuild the evaluation episodes (`metaloop episodes`) from the same curated data, "
                "or give every label train and test rows"
            )
    need = params.shots or 1
    short = {lab: len(texts) for lab, texts in by_label.items() if len(texts) < need}
    if short:
        raise DataError(
            f"domain {domain!r}: adapt.shots={need} but labels {sorted(short)} have only "
            f"{', '.join(f'{lab}={n}' for lab, n in sorted(short.items()))} train rows; "
            "lower adapt.shots or add examples"
        )

    rng = random.Random(f"adapt:{seed}:{domain}")
    val_rows = rows[rows["split"] == "val"]
    val: Examples | None = None
    source = "none"
    pools = {lab: sorted(texts) for lab, texts in by_label.items()}
    for texts in pools.values():
        rng.shuffle(texts)
    if len(val_rows) >= params.early_stopping_min_rows:
        keep = val_rows["label"].astype(str).isin(labels)
        val = Examples(list(map(str, val_rows["text"][keep])), list(map(str, val_rows["label"][keep])))
        source = "val split"
    elif params.holdout_fraction > 0:
        held = {lab: int(len(t) * params.holdout_fraction) for lab, t in pools.items()}
        # holding out must leave each label `need` rows, and the slice must be big enough
        held = {lab: min(n, len(pools[lab]) - need) for lab, n in held.items()}
        if sum(held.values()) >= params.early_stopping_min_rows and all(n > 0 for n in held.values()):
            vt, vl = [], []
            for lab in labels:
                vt += pools[lab][: held[lab]]
                vl += [lab] * held[lab]
                pools[lab] = pools[lab][held[lab] :]
            val = Examples(vt, vl)
            source = "train holdout"
    tt, tl = [], []
    for lab in labels:
        picked = pools[lab][: params.shots] if params.shots else pools[lab]
        tt += picked
        tl += [lab] * len(picked)
    return DomainData(domain, labels, Examples(tt, tl), val, source)


def eval_labels_by_domain(episodes) -> dict[str, list[str]]:
    """{domain: labels} of fixed evaluation episodes (`metaloop.episodes.Episode`s)."""
    out: dict[str, set[str]] = {}
    for ep in episodes:
        out.setdefault(ep.domain, set()).update(ep.labels)
    return {d: sorted(v) for d, v in out.items()}


# ---------------------------------------------------------------- shared helpers


# torch's default RNG (dropout, head init) and its intra-op thread count belong to the process.
# The flow's threads task runner adapts two domains at once in one process: unguarded, their
# dropout draws interleave and each domain's model depends on the other's timing (two identical
# nightly runs differed by one test row in 66). Blocks that seed or set threads hold this lock,
# so they run one at a time in a process; `flow.task_runner: processes` trains domains in parallel.
_TORCH_STATE = threading.RLock()


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run a block with `n` intra-op CPU threads (None: unchanged), alone among such blocks."""
    if not n:
        yield
        return
    with _TORCH_STATE:
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(old)


@contextlib.contextmanager
def seeded(seed: int, threads: int | None = None):
    """Run a block alone among seeded blocks of this process, torch's RNG seeded with `seed` and
    `threads` intra-op threads; the caller's RNG state and thread count come back afterwards.
    Every training block runs here, so here freed memory starts being kept for reuse and the
    heap is trimmed when the outermost block ends (`metaloop.memory.freed_memory_kept`)."""
    with _TORCH_STATE, torch.random.fork_rng(devices=[]), torch_threads(threads), freed_memory_kept():
        torch.manual_seed(seed)
        yield


def encode(tokenizer, texts: Sequence[str], max_length: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Tokenize; dynamic padding unless `pad_to` (then padded/truncated to exactly that)."""
    enc = tokenizer(
        list(texts), truncation=True, max_length=pad_to or max_length,
        padding="max_length" if pad_to else True, return_tensors="pt",
    )
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def batches(n: int, size: int, rng: random.Random | None = None) -> Iterator[list[int]]:
    order = list(range(n))
    if rng is not None:
        rng.shuffle(order)
    for i in range(0, n, size):
        yield order[i : i + size]


def linear_schedule(optimizer, total: int, warmup: float):
    warm = max(1, int(total * warmup)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def final_linear(model: nn.Module) -> nn.Linear:
    """The classifier's last linear layer (BERT: `classifier`; RoBERTa-like: `classifier.out_proj`;
    a `CentroidClassifier`: its class vectors, `centroids`)."""
    if isinstance(getattr(model, "centroids", None), nn.Linear):
        return model.centroids
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Linear):
        return head
    for name in ("out_proj", "dense"):
        if isinstance(getattr(head, name, None), nn.Linear):
            return getattr(head, name)
    raise ConfigError(f"{type(model).__name__}: cannot find the classifier's final linear layer")


def head_modules(model: nn.Module) -> list[str]:
    """Top-level module names forming the classification head (trained by every strategy)."""
    if isinstance(getattr(model, "centroids", None), nn.Linear):
        return ["centroids"]
    names = ["classifier"]
    base = model.base_model
    if getattr(base, "pooler", None) is not None:
        names.append(f"{model.base_model_prefix}.pooler")
    return names


def layers_of(model: nn.Module) -> nn.ModuleList:
    base = model.base_model
    enc = getattr(base, "encoder", None)
    layers = getattr(enc, "layer", None) if enc is not None else None
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(
            f"{type(model).__name__}: no `encoder.layer` stack; BERT-like encoders (BERT, MiniLM, RoBERTa) "
            "are supported"
        )
    return layers


@torch.no_grad()
def pooled_features(model: nn.Module, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 64):
    """Inputs of the final linear layer (what the classifier sees) for `texts`, in eval mode."""
    lin = final_linear(model)
    seen: list[torch.Tensor] = []
    hook = lin.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    was = model.training
    model.eval()
    try:
        for idx in batches(len(texts), batch_size):
            model(**encode(tokenizer, [texts[i] for i in idx], max_length))
    finally:
        hook.remove()
        model.train(was)
    return torch.cat(seen)


@torch.no_grad()
def prototype_init(model: nn.Module, tokenizer, examples: Examples, labels: list[str], max_length: int) -> None:
    """Set the final linear layer to the nearest-centroid classifier of `examples`.

    A `CentroidClassifier`'s class vectors become its rule's prototypes (class names
    included when the rule's label_shots > 0); a linear head gets W_k = 2 c_k, b_k = -||c_k||^2.
    """
    from metaloop.centroid_classifier import CentroidLayer
    from metaloop.meta.head import label_text

    z = pooled_features(model, tokenizer, examples.texts, max_length)
    y = torch.tensor([labels.index(lab) for lab in examples.labels])
    lin = final_linear(model)
    if isinstance(lin, CentroidLayer):
        rule = lin.rule
        names = pooled_features(model, tokenizer, [label_text(n) for n in labels], max_length) \
            if rule.uses_labels else None
        lin.weight.copy_(rule.prototypes(z, y, len(labels), names))
        return
    onehot = F.one_hot(y, len(labels)).to(z.dtype)
    c = onehot.t() @ z / onehot.sum(0).clamp_min(1).unsqueeze(1)
    lin.weight.copy_(2.0 * c)
    lin.bias.copy_(-(c * c).sum(-1))


@torch.no_grad()
def predict_logits(model: nn.Module, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 128):
    was = model.training
    model.eval()
    try:
        outs = [model(**encode(tokenizer, [texts[i] for i in idx], max_length)).logits.float()
                for idx in batches(len(texts), batch_size)]
    finally:
        model.train(was)
    return torch.cat(outs) if outs else torch.empty(0)


def accuracy(model: nn.Module, tokenizer, data: Examples, labels: list[str], max_length: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on `data`."""
    logits = predict_logits(model, tokenizer, data.texts, max_length)
    y = torch.tensor([labels.index(lab) for lab in data.labels])
    return float((logits.argmax(-1) == y).float().mean()), float(F.cross_entropy(logits, y))


@torch.no_grad()
def centroid_accuracy(init: str | Path, train: Examples, test: Examples, labels: list[str], max_length: int,
                      pooling: str = "mean", centroids=None) -> float:
    """Accuracy of the bare encoder with a nearest-centroid head over `train`: the embedding
    meta-training optimises, before any adaptation. `centroids` (`metaloop.meta.head.Centroids`,
    i.e. `params.meta.centroids()`) is the classifier meta-training used; default squared
    Euclidean without class names, as the original ProtoNet.

    It runs alone among this process's torch blocks (`seeded`, `torch_threads`), as
    evaluation does: in the flow's `threads` runner another domain may be timing its latency."""
    with _TORCH_STATE:
        return _centroid_accuracy(init, train, test, labels, max_length, pooling, centroids)


def _centroid_accuracy(init, train: Examples, test: Examples, labels: list[str], max_length: int, pooling: str,
                       centroids) -> float:
    from metaloop.backbone import load_backbone
    from metaloop.meta.head import Centroids, label_text
    from metaloop.meta.pooling import pool

    centroids = centroids or Centroids()
    model, tokenizer = load_backbone(str(init))
    model.eval()

    def embed(texts: Sequence[str]) -> torch.Tensor:
        out = []
        for idx in batches(len(texts), 128):
            enc = encode(tokenizer, [texts[i] for i in idx], max_length)
            out.append(pool(model(**enc).last_hidden_state, enc["attention_mask"], pooling))
        return torch.cat(out)

    y = torch.tensor([labels.index(lab) for lab in train.labels])
    names = embed([label_text(n) for n in labels]) if centroids.uses_labels else None
    protos = centroids.prototypes(embed(train.texts), y, len(labels), names)
    pred = centroids.logits(embed(test.texts), protos).argmax(-1)
    truth = torch.tensor([labels.index(lab) for lab in test.labels])
    return float((pred == truth).float().mean())


# ---------------------------------------------------------------- the init folder


def _resolve(init: str | Path) -> str:
    from metaloop.backbone import resolve

    return resolve(str(init))


def _normalise(name: str, prefix: str) -> str:
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

    where = _resolve(init)
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


# ---------------------------------------------------------------- training


@dataclass
class FitHistory:
    strategy: str
    epochs_run: int = 0
    best_epoch: int = 0
    steps: int = 0
    train_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    stopped_early: bool = False
    learned_lrs: int = 0  # parameters trained with Meta-SGD step sizes
    trainable_params: int = 0
    seconds: float = 0.0
    soup: int = 1  # members averaged into the returned model
    soup_val_accuracy: float | None = None  # the average's held-out accuracy (soup > 1)


def _trainable(model: nn.Module, params: AdaptParams) -> None:
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


def _add_lora(model: nn.Module, params: AdaptParams, init: str | Path) -> nn.Module:
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
    adapter = Path(_resolve(init)) / LORA_ADAPTER
    if (adapter / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        prefix = model.base_model_prefix
        saved = {_normalise(k, prefix).replace(".weight", ""): v for k, v in
                 load_file(str(adapter / "adapter_model.safetensors")).items()}
        loaded = 0
        with torch.no_grad():
            for name, p in wrapped.named_parameters():
                key = _normalise(name, prefix).replace(".weight", "")
                if ".lora_A" in name and key in saved and saved[key].shape == p.shape:
                    p.copy_(saved[key])
                    loaded += 1
        log.info("adapt: %d LoRA A matrices initialised from %s", loaded, adapter)
    return wrapped


def _learned_lr_map(
    model: nn.Module, lrs: dict[str, torch.Tensor], scale: float, head_name: str, prefix: str
) -> dict[nn.Parameter, torch.Tensor]:
    """Trainable parameter -> its learned step sizes (broadcastable to it).

    Encoder keys match by name (any peft/model prefix ignored); `head.weight` ([d], shared
    by every class row) and `head.bias` go to the classifier's final linear layer `head_name`.
    """
    norm = {_normalise(k, prefix): v for k, v in lrs.items() if k not in HEAD_KEYS}
    norm[f"{head_name}.weight"] = lrs.get("head.weight")
    norm[f"{head_name}.bias"] = lrs.get("head.bias")
    out: dict[nn.Parameter, torch.Tensor] = {}
    for name, p in model.named_parameters():
        lr = norm.get(_normalise(name, prefix))
        if lr is None or not p.requires_grad or "original_module" in name:
            continue
        if lr.dim() == 1 and p.dim() == 2 and _normalise(name, prefix) == f"{head_name}.weight":
            lr = lr.unsqueeze(0)  # [d] step sizes shared by every class row
        try:
            if torch.broadcast_shapes(lr.shape, p.shape) == p.shape:
                out[p] = lr.float() * scale
        except RuntimeError:
            log.warning("adapt: learned step sizes for %s have shape %s, not %s; ignored",
                        name, tuple(lr.shape), tuple(p.shape))
    return out


def fit(
    init: str | Path,
    train: Examples,
    labels: Sequence[str],
    params: AdaptParams,
    *,
    val: Examples | None = None,
    max_length: int = 64,
    seed: int = 13,
    centroids=None,
    pooling: str = "mean",
):
    """Train a classifier in memory; returns (model, tokenizer, FitHistory). Nothing is saved.

    The model returned is a plain `PreTrainedModel` (LoRA already merged), or with
    `params.classifier` = centroids a `CentroidClassifier` whose rule is `centroids`
    (`params.meta.centroids()`: the classifier the encoder was meta-trained with) and whose
    class names join the training rows, weighted by its label_shots; in eval mode.

    `params.soup` > 1 fine-tunes that many members, seeds `seed`, `seed + 1`, ..., from the
    same init and returns one model holding the mean of their weights (a uniform model
    soup: fine-tunings of one init stay in one basin, so their average is a model, not a
    blur). The history is the first member's, with `soup` and the total seconds.
    """
    kw = {"val": val, "max_length": max_length, "centroids": centroids, "pooling": pooling}
    model, tokenizer, hist = _fit_one(init, train, labels, params, seed=seed, **kw)
    if params.soup == 1:
        return model, tokenizer, hist
    states = [model.state_dict()]
    for i in range(1, params.soup):
        member, _, h = _fit_one(init, train, labels, params, seed=seed + i, **kw)
        states.append(member.state_dict())
        hist.seconds += h.seconds
    model.load_state_dict(mean_weights(states))
    hist.soup = params.soup
    if val is not None and len(val):  # the returned model's own held-out accuracy, not member 0's
        hist.soup_val_accuracy = accuracy(model, tokenizer, val, labels, max_length)[0]
    return model, tokenizer, hist


def mean_weights(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of state dicts with the same keys (a model soup, averaged
    checkpoints): floating tensors averaged in float64 and cast back, others (integer
    buffers such as position ids) taken from the first."""
    if not states:
        raise ValueError("mean_weights needs at least one state dict")
    return {k: (sum(s[k].double() for s in states) / len(states)).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()}


def _fit_one(
    init: str | Path,
    train: Examples,
    labels: Sequence[str],
    params: AdaptParams,
    *,
    val: Examples | None,
    max_length: int,
    seed: int,
    centroids,
    pooling: str,
):
    """One fine-tuning run (see `fit`)."""
    labels = list(labels)
    if params.classifier == "centroids" and centroids is None:
        raise ConfigError("adapt.classifier: centroids needs the centroid rule: pass centroids=params.meta.centroids()")
    rule = centroids if params.classifier == "centroids" else None
    t0 = time.perf_counter()
    with seeded(seed, params.threads):
        model, tokenizer = load_for_classification(init, labels, centroids=rule, pooling=pooling)
        if rule is not None and rule.uses_labels:  # the names are training rows too, as in the prototypes
            from metaloop.meta.head import label_text

            names = [label_text(n) for n in labels]
            rows = Examples([*train.texts, *names], [*train.labels, *labels])
            row_weights = torch.tensor([1.0] * len(train) + [rule.label_shots] * len(names))
        else:
            rows, row_weights = train, None
        if params.prototype_head:
            prototype_init(model, tokenizer, train, labels, max_length)
        learned = read_learned_lrs(_resolve(init)) if params.learned_lrs else None
        head_name = next(n for n, m in model.named_modules() if m is final_linear(model))
        prefix = model.base_model_prefix
        if params.strategy == "lora":
            model = _add_lora(model, params, init)
        else:
            _trainable(model, params)
        sgd = _learned_lr_map(model, learned, params.learned_lr_scale, head_name, prefix) if learned else {}
        hist = FitHistory(params.strategy, learned_lrs=len(sgd))
        head_ids = {id(p) for n, p in model.named_parameters()
                    if p.requires_grad and any(h in n for h in ("classifier", "pooler", "centroids"))}
        groups = {"head": [], "enc": []}
        for n, p in model.named_parameters():
            if p.requires_grad and p not in sgd:
                groups["head" if id(p) in head_ids else "enc"].append(p)
        hist.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        enc_lr = params.lora_lr if params.strategy == "lora" else params.lr
        opt_groups = [g for g in (
            {"params": groups["enc"], "lr": enc_lr},
            {"params": groups["head"], "lr": params.head_lr},
        ) if g["params"]]
        optimizer = torch.optim.AdamW(opt_groups, weight_decay=params.weight_decay) if opt_groups else None
        steps_per_epoch = math.ceil(len(rows) / params.batch_size)
        total = steps_per_epoch * params.epochs
        scheduler = linear_schedule(optimizer, total, params.warmup) if optimizer else None
        y_all = torch.tensor([labels.index(lab) for lab in rows.labels])
        rng = random.Random(f"adapt-batches:{seed}")
        best: tuple[float, float] | None = None
        best_state = None
        bad = 0
        for epoch in range(1, params.epochs + 1):
            model.train()
            losses = []
            for idx in batches(len(rows), params.batch_size, rng):
                inputs = encode(tokenizer, [rows.texts[i] for i in idx], max_length)
                logits = model(**inputs).logits
                if row_weights is None:
                    loss = F.cross_entropy(logits, y_all[idx])
                else:
                    w = row_weights[idx]
                    loss = (F.cross_entropy(logits, y_all[idx], reduction="none") * w).sum() / w.sum()
                loss.backward()
                if optimizer:
                    optimizer.step()
                    scheduler.step()
                with torch.no_grad():
                    for p, lr in sgd.items():
                        if p.grad is not None:
                            p.sub_(lr * p.grad)
                model.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                hist.steps += 1
            hist.train_loss.append(sum(losses) / len(losses))
            hist.epochs_run = epoch
            if val is not None and len(val):
                acc, vloss = accuracy(model, tokenizer, val, labels, max_length)
                hist.val_accuracy.append(acc)
                hist.val_loss.append(vloss)
                log.info("adapt: epoch %d train loss %.4f, held-out acc %.4f loss %.4f",
                         epoch, hist.train_loss[-1], acc, vloss)
                if best is None or (acc, -vloss) > best:
                    best, bad, hist.best_epoch = (acc, -vloss), 0, epoch
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    bad += 1
                    if bad >= params.patience:
                        hist.stopped_early = True
                        break
            else:
                hist.best_epoch = epoch
        if best_state is not None:
            model.load_state_dict(best_state)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
    model.eval()
    hist.seconds = time.perf_counter() - t0
    return model, tokenizer, hist


# ---------------------------------------------------------------- saving


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


# ---------------------------------------------------------------- per domain


@dataclass
class AdaptResult:
    domain: str
    model_dir: str
    strategy: str
    labels: list[str]
    n_train: int
    n_val: int
    val_source: str
    val_accuracy: float | None  # best epoch's held-out accuracy
    epochs_run: int
    best_epoch: int
    stopped_early: bool
    learned_lrs: int
    trainable_params: int
    seconds: float

    def metrics(self) -> dict[str, float]:
        out = {"n_train": self.n_train, "n_val": self.n_val, "epochs_run": self.epochs_run,
               "best_epoch": self.best_epoch, "adapt_seconds": self.seconds}
        if self.val_accuracy is not None:
            out["val_accuracy"] = 100.0 * self.val_accuracy
        return out


def adapt_domain(
    init: str | Path,
    table: pd.DataFrame | str | Path,
    domain: str,
    params: AdaptParams,
    out_dir: str | Path | None = None,
    *,
    eval_labels: Sequence[str] | None = None,
    max_length: int = 64,
    seed: int = 13,
    centroids=None,
    pooling: str = "mean",
) -> AdaptResult:
    """Adapt and save one domain's classifier (default folder: params.output_dir / domain).

    `centroids` and `pooling` are `fit`'s (used when params.classifier is centroids)."""
    data = domain_data(table, domain, params, eval_labels=eval_labels, seed=seed)
    model, tokenizer, hist = fit(init, data.train, data.labels, params, val=data.val, max_length=max_length,
                                 seed=seed, centroids=centroids, pooling=pooling)
    out = Path(out_dir) if out_dir is not None else Path(params.output_dir) / domain
    best_val = hist.val_accuracy[hist.best_epoch - 1] if hist.val_accuracy else None
    if hist.soup_val_accuracy is not None:
        best_val = hist.soup_val_accuracy
    result = AdaptResult(
        domain=domain, model_dir=str(out), strategy=params.strategy, labels=data.labels,
        n_train=len(data.train), n_val=len(data.val) if data.val else 0, val_source=data.val_source,
        val_accuracy=best_val, epochs_run=hist.epochs_run, best_epoch=hist.best_epoch,
        stopped_early=hist.stopped_early, learned_lrs=hist.learned_lrs,
        trainable_params=hist.trainable_params, seconds=round(hist.seconds, 3),
    )
    save_classifier(model, tokenizer, out, {
        "recipe": "fp32", "steps": [], "domain": domain, "init": str(init), "max_length": max_length,
        "classifier": params.classifier,
        "adapt": params.model_dump(mode="json"), "history": asdict(hist), "seed": seed,
    })
    return result


@dataclass
class AdaptOutcome:
    results: dict[str, AdaptResult]
    errors: dict[str, str]  # domain -> the DataError's message

    @property
    def ok(self) -> bool:
        return not self.errors


def adapt_domains(
    init: str | Path,
    table: pd.DataFrame | str | Path,
    domains: Sequence[str],
    params: AdaptParams,
    out_root: str | Path | None = None,
    *,
    eval_labels: Mapping[str, Sequence[str]] | None = None,
    max_length: int = 64,
    seed: int = 13,
    centroids=None,
    pooling: str = "mean",
) -> AdaptOutcome:
    """Adapt every domain; a domain whose data is unusable is reported, and the others go on."""
    table = _table(table)
    root = Path(out_root) if out_root is not None else Path(params.output_dir)
    outcome = AdaptOutcome({}, {})
    for domain in domains:
        try:
            outcome.results[domain] = adapt_domain(
                init, table, domain, params, root / domain,
                eval_labels=(eval_labels or {}).get(domain), max_length=max_length, seed=seed,
                centroids=centroids, pooling=pooling,
            )
        except DataError as err:
            log.warning("adapt: %s", err)
            outcome.errors[domain] = str(err)
    return outcome
