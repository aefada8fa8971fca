"""Task-specific distillation: a shallower student initialised from the teacher's layers.

`make_student(teacher, layers)` copies the teacher (embeddings, pooler, classifier and any
pruned shape included) keeping only Transformer layers `layers`, as DistilBERT initialises
from every other teacher layer. `kd_fit` trains a student on the teacher's soft labels

    L = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)
        + hidden_weight * MSE(student layer i, the teacher layer it was copied from)

on the domain's labelled examples, on unlabelled in-domain texts (KD term only) and on
`augment` noisy copies of each text per epoch (words dropped or masked; KD term only).
Teacher and student may have different tokenizers (after vocabulary trimming): each
sees the texts through its own.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from metaloop.adapt import (
    Examples,
    accuracy,
    batches,
    encode,
    layers_of,
    linear_schedule,
    predict_logits,
)

log = logging.getLogger("metaloop.compress")


def spread(n_teacher: int, n_student: int) -> list[int]:
    """`n_student` teacher layer indices spread evenly, always including the last layer."""
    if n_student >= n_teacher:
        return list(range(n_teacher))
    if n_student == 1:
        return [n_teacher - 1]
    step = (n_teacher - 1) / (n_student - 1)
    return sorted({round(i * step) for i in range(n_student)})


def make_student(teacher: nn.Module, layers: int | Sequence[int]) -> tuple[nn.Module, list[int]]:
    """A deep copy of `teacher` keeping only the given layers (an int: that many, spread)."""
    n = len(layers_of(teacher))
    picked = spread(n, layers) if isinstance(layers, int) else sorted(int(i) for i in layers)
    if not picked or min(picked) < 0 or max(picked) >= n:
        raise ValueError(f"student layers {picked} must be indices of the teacher's {n} layers")
    student = copy.deepcopy(teacher)
    stack = layers_of(student)
    kept = nn.ModuleList([stack[i] for i in picked])
    for j, layer in enumerate(kept):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = j
    student.base_model.encoder.layer = kept
    student.config.num_hidden_layers = len(picked)
    return student, picked


@dataclass
class KDHistory:
    epochs_run: int = 0
    best_epoch: int = 0
    train_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    steps: int = 0


def _noisy(text: str, rng: random.Random, mask: str | None) -> str:
    words = text.split()
    out = []
    for w in words:
        r = rng.random()
        if r < 0.1 and len(words) > 2:
            continue
        out.append(mask if (mask and r < 0.2) else w)
    return " ".join(out) or text


def _with_copies(texts: list[str], ys: list[int], augment: int, rng: random.Random, mask: str | None):
    out_t, out_y = list(texts), list(ys)
    for _ in range(augment):
        out_t += [_noisy(t, rng, mask) for t in texts]
        out_y += [-100] * len(texts)
    return out_t, out_y


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(a.dtype)
    return ((a - b) ** 2 * m).sum() / (m.sum() * a.shape[-1]).clamp_min(1.0)


def kd_fit(
    student: nn.Module,
    student_tokenizer,
    teacher: nn.Module,
    teacher_tokenizer,
    train: Examples,
    labels: list[str],
    *,
    unlabeled: Sequence[str] = (),
    val: Examples | None = None,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-4,
    temperature: float = 2.0,
    alpha: float = 0.5,
    hidden_weight: float = 0.0,
    teacher_layers: Sequence[int] | None = None,
    augment: int = 0,
    weight_decay: float = 0.01,
    warmup: float = 0.1,
    patience: int = 3,
    max_length: int = 64,
    seed: int = 13,
) -> KDHistory:
    """Train `student` in place to imitate `teacher` (kept frozen, eval mode)."""
    rng = random.Random(f"kd:{seed}")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    for p in student.parameters():
        p.requires_grad_(True)
    y_of = {lab: i for i, lab in enumerate(labels)}
    base_texts = list(train.texts) + list(unlabeled)
    base_y = [y_of[lab] for lab in train.labels] + [-100] * len(unlabeled)
    mask = getattr(student_tokenizer, "mask_token", None)
    if mask is not None and getattr(teacher_tokenizer, "mask_token", None) != mask:
        mask = None
    n_per_epoch = len(base_texts) * (1 + augment)
    total = max(1, -(-n_per_epoch // batch_size) * epochs)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = linear_schedule(optimizer, total, warmup)
    want_hidden = hidden_weight > 0 and teacher_layers is not None
    hist = KDHistory()
    best, best_state, bad = None, None, 0
    # Without the hidden-state term the teacher is needed only for logits: the noisy copies
    # are drawn once and every text is scored by the teacher once, not once per epoch.
    fixed = not want_hidden
    if fixed:
        texts, ys = _with_copies(base_texts, base_y, augment, rng, mask)
        cached = predict_logits(teacher, teacher_tokenizer, texts, max_length)
    for epoch in range(1, epochs + 1):
        if not fixed:
            texts, ys = _with_copies(base_texts, base_y, augment, rng, mask)
        y_all = torch.tensor(ys)
        student.train()
        losses = []
        for idx in batches(len(texts), batch_size, rng):
            chunk = [texts[i] for i in idx]
            s_in = encode(student_tokenizer, chunk, max_length)
            if fixed:
                t_logits = cached[idx]
            else:
                t_in = encode(teacher_tokenizer, chunk, max_length)
                with torch.no_grad():
                    t_out = teacher(**t_in, output_hidden_states=True)
                t_logits = t_out.logits
            s_out = student(**s_in, output_hidden_states=want_hidden)
            T = temperature
            kd = F.kl_div(F.log_softmax(s_out.logits / T, -1), F.softmax(t_logits / T, -1),
                          reduction="batchmean") * T * T
            loss = alpha * kd
            y = y_all[idx]
            if alpha < 1 and (y >= 0).any():
                loss = loss + (1 - alpha) * F.cross_entropy(s_out.logits, y, ignore_index=-100)
            # hidden states compare position by position: only when both tokenizations align
            if want_hidden and torch.equal(s_in["attention_mask"], t_in["attention_mask"]):
                for j, tl in enumerate(teacher_layers):
                    loss = loss + hidden_weight * _masked_mse(
                        s_out.hidden_states[j + 1], t_out.hidden_states[tl + 1], s_in["attention_mask"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            hist.steps += 1
        hist.train_loss.append(sum(losses) / max(1, len(losses)))
        hist.epochs_run = epoch
        if val is not None and len(val):
            acc, vloss = accuracy(student, student_tokenizer, val, labels, max_length)
            hist.val_accuracy.append(acc)
            log.info("kd: epoch %d train loss %.4f, held-out acc %.4f", epoch, hist.train_loss[-1], acc)
            if best is None or (acc, -vloss) > best:
                best, bad, hist.best_epoch = (acc, -vloss), 0, epoch
                best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
            else:
                bad += 1
                if bad >= patience:
                    break
        else:
            hist.best_epoch = epoch
    if best_state is not None:
        student.load_state_dict(best_state)
    student.eval()
    return hist
