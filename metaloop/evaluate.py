"""Score a saved domain classifier: accuracy, size on disk, CPU latency and throughput.

    result = evaluate("artifacts/compressed/hospitality/small", domain="hospitality", recipe="small",
                      test=Examples(texts, labels), episodes=eval_episodes, texts_of=pool.texts)
    mlflow.log_metrics(result.metrics())   # in a task; the library never imports mlflow

* accuracy: on the domain's `test` rows, and on its fixed evaluation episodes (mean over
  episodes of the query accuracy; query labels mapped to the model's by name), also per
  shot count. A model folder of any format (`metaloop.compress.runtime`) is accepted.
  A fixed classifier does not look at an episode's support set, so with the standard
  evaluation episodes (queries = all test rows) episode accuracy equals test accuracy.
* few-shot accuracy of an *initialisation* (`few_shot_accuracy`): for each fixed evaluation
  episode, adapt a classifier from the init on the episode's support rows only
  (`metaloop.adapt.fit`), score its queries; mean and per shot count
  (`few_shot_accuracy_{k}shot`).
  This is what compares a challenger meta-learned init with the champion.
* size: every file in the folder (weights, tokenizer, config), in MB (10^6 bytes).
* latency: batch 1, inputs padded to `seq_len` tokens; `warmup` calls first, not timed,
  then `repeats` timed calls -> p50 and p95 (linear interpolation between order statistics).
* throughput: batch `batch` (32), padded the same way; warm-up, then the median of
  `batch_repeats` timed calls -> texts per second.
* `timing=False` skips both (their fields are None, absent from `metrics()`): re-scoring a
  champion on new episodes needs only its accuracy and per-query record, and the warm-up
  and ~100 timed calls were most of that re-scoring's time.

Latency numbers depend on the machine and its load: `threads` (torch intra-op threads and
onnxruntime's intra_op_num_threads) is recorded with the result, and so is the load average.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from metaloop.adapt import Examples, torch_threads
from metaloop.promotion import outcome_record


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p95_ms: float
    mean_ms: float
    samples_ms: tuple[float, ...]
    warmup: int


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure_latency(
    fn: Callable[[], object], *, warmup: int = 10, repeats: int = 50, clock: Callable[[], float] = time.perf_counter
) -> LatencyStats:
    """Call `fn` `warmup` times untimed, then `repeats` times timed; milliseconds."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = clock()
        fn()
        samples.append((clock() - start) * 1000.0)
    return LatencyStats(percentile(samples, 50), percentile(samples, 95), statistics.fmean(samples),
                        tuple(samples), warmup)


def size_on_disk(path: str | Path) -> int:
    """Bytes of every regular file under `path` (a folder) or of `path` itself."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


@dataclass(frozen=True)
class EvalResult:
    domain: str
    recipe: str
    model_dir: str
    format: str
    test_accuracy: float | None  # percent, the domain's test rows
    n_test: int
    episode_accuracy: float | None  # percent, mean over the fixed evaluation episodes
    accuracy_by_shots: dict[int, float]  # percent, mean over the episodes with k shots
    n_episodes: int
    eval_hash: str | None
    size_mb: float
    params: int | None
    p50_ms_batch1: float | None  # the four timings: None when evaluated with timing=False
    p95_ms_batch1: float | None
    ms_batch32: float | None
    throughput_batch32: float | None  # texts per second
    seq_len: int
    threads: int
    load_avg: float | None = None
    extra: dict = field(default_factory=dict)
    correct: str | None = None  # per-query outcomes behind `accuracy` (promotion.outcome_record)

    def metrics(self) -> dict[str, float]:
        """Flat numeric metrics (for MLflow); accuracy keys absent when not measured.

        `accuracy` is the episode accuracy when episodes were given (what promotion compares),
        else the test accuracy; `test_accuracy` and `accuracy_{k}shot` are always their own.
        """
        timings = {"p50_ms_batch1": self.p50_ms_batch1, "p95_ms_batch1": self.p95_ms_batch1,
                   "ms_batch32": self.ms_batch32, "throughput_batch32": self.throughput_batch32}
        out = {"size_mb": self.size_mb, **{k: v for k, v in timings.items() if v is not None}}
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy
        if self.test_accuracy is not None:
            out["test_accuracy"] = self.test_accuracy
        if self.episode_accuracy is not None:
            out["episode_accuracy"] = self.episode_accuracy
        for k, v in self.accuracy_by_shots.items():
            out[f"accuracy_{k}shot"] = v
        if self.params is not None:
            out["params"] = float(self.params)
        return out

    @property
    def accuracy(self) -> float | None:
        return self.episode_accuracy if self.episode_accuracy is not None else self.test_accuracy

    def row(self) -> dict:
        """The benchmark's JSON row."""
        return {"domain": self.domain, "recipe": self.recipe, "size_mb": round(self.size_mb, 3),
                "p50_ms_batch1": None if self.p50_ms_batch1 is None else round(self.p50_ms_batch1, 3),
                "throughput_batch32": None if self.throughput_batch32 is None else round(self.throughput_batch32, 1),
                "accuracy": None if self.test_accuracy is None else round(self.test_accuracy, 2)}

    def to_dict(self) -> dict:
        return asdict(self)


def _outcomes(clf, data: Examples) -> list[bool]:
    return [p == y for p, y in zip(clf.predict(data.texts), data.labels)]


def episode_accuracy(
    clf, episodes: Iterable, texts_of: Callable[[Iterable[str]], list[str]],
    outcomes: dict[str, bool] | None = None,
) -> tuple[float | None, dict[int, float], int]:
    """(mean query accuracy over episodes, by shots, episodes scored) for a fixed classifier.

    Each episode's queries are scored by label name; the model predicts among all its labels.
    Predictions are cached by text, so episodes sharing queries (all of a domain's test rows)
    cost one pass. `outcomes`, if given, receives query row id -> right.
    """
    cache: dict[str, str] = {}
    per: list[float] = []
    by_shots: dict[int, list[float]] = {}
    for ep in episodes:
        if not ep.query_ids:
            continue
        texts = texts_of(ep.query_ids)
        todo = sorted({t for t in texts if t not in cache})
        if todo:
            cache.update(zip(todo, clf.predict(todo)))
        truth = [ep.labels[y] for y in ep.query_y]
        right = [cache[t] == y for t, y in zip(texts, truth)]
        if outcomes is not None:
            outcomes.update(zip(ep.query_ids, right))
        acc = 100.0 * float(np.mean(right))
        per.append(acc)
        shots = len(ep.support_ids) // max(1, ep.ways)
        by_shots.setdefault(shots, []).append(acc)
    if not per:
        return None, {}, 0
    return statistics.fmean(per), {k: statistics.fmean(v) for k, v in sorted(by_shots.items())}, len(per)


@dataclass(frozen=True)
class FewShotResult:
    mean: float  # percent, over episodes
    by_shots: dict[int, float]
    per_episode: dict[str, float]
    eval_hash: str | None = None

    def metrics(self) -> dict[str, float]:
        return {"few_shot_accuracy": self.mean, **{f"few_shot_accuracy_{k}shot": v for k, v in self.by_shots.items()}}


def few_shot_accuracy(
    init: str | Path,
    episodes: Sequence,
    texts_of: Callable[[Iterable[str]], list[str]],
    params,
    *,
    max_length: int = 64,
    seed: int = 13,
    eval_hash: str | None = None,
    centroids=None,
    pooling: str = "mean",
) -> FewShotResult:
    """Adapt from `init` on each episode's support set (AdaptParams `params`; `centroids`,
    `pooling` as `metaloop.adapt.fit`), score its queries."""
    from metaloop.adapt import fit, predict_logits

    per: dict[str, float] = {}
    by_shots: dict[int, list[float]] = {}
    for ep in episodes:
        labels = list(ep.labels)
        support = Examples(texts_of(ep.support_ids), [labels[y] for y in ep.support_y])
        model, tok, _ = fit(init, support, labels, params, max_length=max_length, seed=seed, centroids=centroids,
                            pooling=pooling)
        logits = predict_logits(model, tok, texts_of(ep.query_ids), max_length)
        acc = 100.0 * float((logits.argmax(-1).numpy() == np.asarray(ep.query_y)).mean()) if len(ep.query_y) else 0.0
        per[ep.id] = acc
        by_shots.setdefault(len(ep.support_ids) // max(1, ep.ways), []).append(acc)
    if not per:
        raise ValueError("few_shot_accuracy needs at least one episode")
    return FewShotResult(statistics.fmean(per.values()),
                         {k: statistics.fmean(v) for k, v in sorted(by_shots.items())}, per, eval_hash)


def time_classifier(
    clf, texts: Sequence[str], *, seq_len: int = 64, batch: int = 32, warmup: int = 10, repeats: int = 100,
    batch_repeats: int = 10,
) -> tuple[LatencyStats, LatencyStats]:
    """(batch-1 latency, batch-`batch` latency) of a loaded classifier, inputs padded to `seq_len`."""
    texts = [texts[i % len(texts)] for i in range(batch)]
    one = clf.encode(texts[:1], pad_to=seq_len)
    many = clf.encode(texts, pad_to=seq_len)
    lat = measure_latency(lambda: clf.logits(one), warmup=warmup, repeats=repeats)
    thr = measure_latency(lambda: clf.logits(many), warmup=max(1, warmup // 5), repeats=batch_repeats)
    return lat, thr


def interleaved_timing(
    classifiers: Mapping[str, object], texts: Sequence[str], *, rounds: int = 5, seq_len: int = 64,
    batch: int = 32, repeats: int = 30, batch_repeats: int = 3,
) -> dict[str, dict[str, float]]:
    """Time several classifiers in alternation, `rounds` times; medians over rounds.

    On a shared machine load comes and goes: measuring A fully, then B, charges whichever
    ran during a busy spell. Alternating short runs and taking the median of the rounds'
    medians spreads the spells over every model. Returns {name: {p50_ms, p95_ms, ms_batch}}.
    """
    per: dict[str, list[tuple[float, float, float]]] = {k: [] for k in classifiers}
    for r in range(rounds):
        for name, clf in classifiers.items():
            lat, thr = time_classifier(clf, texts, seq_len=seq_len, batch=batch, warmup=5 if r == 0 else 2,
                                       repeats=repeats, batch_repeats=batch_repeats)
            per[name].append((lat.p50_ms, lat.p95_ms, thr.p50_ms))
    return {name: {"p50_ms": statistics.median(x[0] for x in v), "p95_ms": statistics.median(x[1] for x in v),
                   "ms_batch": statistics.median(x[2] for x in v)} for name, v in per.items()}


def _sample_texts(data: Examples | None, n: int) -> list[str]:
    base = list(data.texts) if data is not None and len(data) else ["where is my order and when will it arrive"]
    return [base[i % len(base)] for i in range(n)]


def _timings(lat: LatencyStats | None, thr: LatencyStats | None, batch: int) -> dict[str, float | None]:
    if lat is None or thr is None:
        return dict.fromkeys(("p50_ms_batch1", "p95_ms_batch1", "ms_batch32", "throughput_batch32"))
    return {"p50_ms_batch1": lat.p50_ms, "p95_ms_batch1": lat.p95_ms, "ms_batch32": thr.p50_ms,
            "throughput_batch32": batch * 1000.0 / thr.p50_ms if thr.p50_ms > 0 else float("inf")}


def evaluate(
    model_dir: str | Path,
    *,
    domain: str,
    recipe: str,
    test: Examples | None = None,
    episodes: Sequence | None = None,
    texts_of: Callable[[Iterable[str]], list[str]] | None = None,
    eval_hash: str | None = None,
    seq_len: int = 64,
    batch: int = 32,
    threads: int | None = None,
    warmup: int = 10,
    repeats: int = 100,
    batch_repeats: int = 10,
    timing: bool = True,
) -> EvalResult:
    """Load `model_dir` from disk and score it (see the module docstring)."""
    from metaloop.compress.runtime import load_classifier

    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with torch_threads(threads):
        clf = load_classifier(model_dir, threads=threads)
        right = _outcomes(clf, test) if test is not None and len(test) else None
        acc = 100.0 * float(np.mean(right)) if right else None
        ep_acc, by_shots, n_eps, by_query = (None, {}, 0, {})
        if episodes:
            if texts_of is None:
                raise ValueError("episodes need texts_of (row ids -> texts), e.g. Pool.texts")
            ep_acc, by_shots, n_eps = episode_accuracy(clf, episodes, texts_of, by_query)
        # The record behind `accuracy` (what promotion compares): the episodes' distinct
        # queries in id order, else the test rows in order.
        if by_query:
            right = [by_query[q] for q in sorted(by_query)]
        lat, thr = (time_classifier(clf, _sample_texts(test, batch), seq_len=seq_len, batch=batch, warmup=warmup,
                                    repeats=repeats, batch_repeats=batch_repeats) if timing else (None, None))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return EvalResult(
        domain=domain, recipe=recipe, model_dir=str(model_dir), format=clf.meta.get("format", "hf"),
        test_accuracy=acc, n_test=len(test) if test is not None else 0,
        episode_accuracy=ep_acc, accuracy_by_shots=by_shots, n_episodes=n_eps, eval_hash=eval_hash,
        size_mb=size_on_disk(model_dir) / 1e6, params=clf.n_params,
        **_timings(lat, thr, batch),
        seq_len=seq_len, threads=threads, load_avg=load,
        correct=outcome_record(right) if right else None,
    )
