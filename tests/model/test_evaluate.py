"""Evaluation: latency code (warm-up excluded, percentiles right) with a controlled clock,
size on disk, episode accuracy by label name, and the typed result on a tiny classifier.
Nothing here checks speed."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest
import torch

from metaloop.adapt import AdaptParams, Examples, adapt_domain
from metaloop.backbone import tiny_bert
from metaloop.episodes import Episode
from metaloop.evaluate import (
    EvalResult,
    episode_accuracy,
    evaluate,
    few_shot_accuracy,
    interleaved_timing,
    measure_latency,
    percentile,
    size_on_disk,
)

torch.set_num_threads(1)


class StepClock:
    """A clock that only moves when the timed function says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_warmup_calls_are_not_timed_and_percentiles_are_exact():
    clock = StepClock()
    durations = [5.0] * 3 + [float(i) for i in range(1, 101)]  # seconds: 3 slow warm-ups, then 1..100
    calls = iter(durations)

    def fn():
        clock.now += next(calls)

    stats = measure_latency(fn, warmup=3, repeats=100, clock=clock)
    assert stats.warmup == 3 and len(stats.samples_ms) == 100
    assert stats.samples_ms == tuple(1000.0 * i for i in range(1, 101))  # no warm-up among them
    assert stats.p50_ms == pytest.approx(1000.0 * 50.5)
    assert stats.p95_ms == pytest.approx(1000.0 * 95.05)
    assert stats.mean_ms == pytest.approx(1000.0 * 50.5)
    with pytest.raises(StopIteration):
        next(calls)  # exactly warmup + repeats calls


def test_percentile_matches_numpy():
    rng = random.Random(0)
    for n in (1, 2, 7, 100):
        xs = [rng.random() for _ in range(n)]
        for q in (0, 5, 50, 95, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    with pytest.raises(ValueError):
        percentile([], 50)


def test_size_on_disk_counts_every_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_bytes(b"y" * 234)
    assert size_on_disk(tmp_path) == 1234
    assert size_on_disk(tmp_path / "a.bin") == 1000


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """(folder, test examples, texts by id): a tiny classifier of three keyword labels."""
    root = tmp_path_factory.mktemp("evaluate")
    tiny_bert(root / "init")
    rng = random.Random(0)
    keys = {"alpha": "apple apricot", "beta": "banana berry", "gamma": "grape guava"}
    rows = []
    for label, words in keys.items():
        for i in range(12):
            rows.append({"id": f"{label}-{i}", "text": " ".join(rng.sample(words.split() + ["x", "y"], 3)),
                         "label": label, "domain": "fruit", "split": "test" if i % 3 == 0 else "train"})
    table = pd.DataFrame(rows)
    params = AdaptParams(epochs=25, lr=3e-3, head_lr=3e-2, batch_size=8, early_stopping_min_rows=1000)
    adapt_domain(root / "init", table, "fruit", params, root / "clf", max_length=16)
    test = table[table.split == "test"]
    return root / "clf", Examples(list(test.text), list(test.label)), dict(zip(table.id, table.text)), table


def test_episode_accuracy_maps_labels_by_name(classifier):
    from metaloop.compress.runtime import load_classifier

    folder, test, texts, table = classifier
    clf = load_classifier(folder)
    pred = dict(zip(test.texts, clf.predict(test.texts)))
    q = table[table.split == "test"]
    order = ["gamma", "alpha", "beta"]  # an episode's own class order, unlike the model's
    ep = Episode(id="e", domain="fruit", labels=tuple(order), support_ids=("alpha-1", "beta-1", "gamma-1"),
                 support_y=(1, 2, 0), query_ids=tuple(q.id), query_y=tuple(order.index(y) for y in q.label))
    mean, by_shots, n = episode_accuracy(clf, [ep, ep], lambda ids: [texts[i] for i in ids])
    truth = 100.0 * np.mean([pred[t] == y for t, y in zip(q.text, q.label)])
    assert n == 2 and mean == pytest.approx(truth) and by_shots == {1: pytest.approx(truth)}


def test_evaluate_returns_one_typed_result(classifier):
    folder, test, texts, table = classifier
    q = table[table.split == "test"]
    labels = sorted(set(q.label))
    ep = Episode(id="e", domain="fruit", labels=tuple(labels), support_ids=("alpha-1", "beta-1", "gamma-1"),
                 support_y=(0, 1, 2), query_ids=tuple(q.id), query_y=tuple(labels.index(y) for y in q.label))
    r = evaluate(folder, domain="fruit", recipe="fp32", test=test, episodes=[ep], texts_of=lambda ids: [texts[i] for i in ids],
                 eval_hash="abc", seq_len=16, threads=1, warmup=2, repeats=5, batch_repeats=2)
    assert isinstance(r, EvalResult) and r.format == "hf" and r.threads == 1 and r.seq_len == 16
    assert 0.0 <= r.test_accuracy <= 100.0 and r.n_test == len(test)
    assert r.episode_accuracy == pytest.approx(r.test_accuracy)  # its queries are the test rows
    assert r.accuracy == r.episode_accuracy
    assert r.size_mb == pytest.approx(size_on_disk(folder) / 1e6)
    assert 0 < r.p50_ms_batch1 <= r.p95_ms_batch1 and r.throughput_batch32 > 0
    assert r.params > 0
    metrics = r.metrics()
    assert {"accuracy", "test_accuracy", "episode_accuracy", "accuracy_1shot", "size_mb", "p50_ms_batch1", "p95_ms_batch1",
            "throughput_batch32"} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    assert set(r.row()) == {"domain", "recipe", "size_mb", "p50_ms_batch1", "throughput_batch32", "accuracy"}
    # The per-query record behind `accuracy` (promotion's significance test): one bit per
    # distinct query, in id order, agreeing with the model's predictions.
    from metaloop.compress.runtime import load_classifier
    from metaloop.promotion import read_outcomes

    right = read_outcomes(r.correct)
    pred = dict(zip(q.text, load_classifier(folder).predict(list(q.text))))
    by_id = dict(zip(q.id, (pred[t] == y for t, y in zip(q.text, q.label))))
    assert right == [by_id[i] for i in sorted(by_id)]
    assert 100.0 * np.mean(right) == pytest.approx(r.accuracy)
    test_only = evaluate(folder, domain="fruit", recipe="fp32", test=test, seq_len=16, threads=1, warmup=1, repeats=2,
                         batch_repeats=1)
    assert len(read_outcomes(test_only.correct)) == len(test)
    # Accuracy only (a champion's re-scoring): the same scores and record, no timings.
    untimed = evaluate(folder, domain="fruit", recipe="fp32", test=test, episodes=[ep],
                       texts_of=lambda ids: [texts[i] for i in ids], eval_hash="abc", seq_len=16, threads=1,
                       timing=False)
    assert untimed.correct == r.correct and untimed.accuracy == pytest.approx(r.accuracy)
    assert untimed.p50_ms_batch1 is None and untimed.throughput_batch32 is None
    assert {"accuracy", "accuracy_1shot", "size_mb"} <= set(untimed.metrics())
    assert not {"p50_ms_batch1", "p95_ms_batch1", "ms_batch32", "throughput_batch32"} & set(untimed.metrics())


def test_few_shot_accuracy_adapts_on_each_support_set(classifier):
    folder, _, texts, table = classifier
    init = folder.parent / "init"
    q = table[table.split == "test"]
    labels = sorted(set(q.label))
    eps = [Episode(id=f"e{k}", domain="fruit", labels=tuple(labels),
                   support_ids=tuple(f"{lab}-{i}" for lab in labels for i in range(1, 1 + k)),
                   support_y=tuple(j for j in range(3) for _ in range(k)),
                   query_ids=tuple(q.id), query_y=tuple(labels.index(y) for y in q.label)) for k in (1, 2)]
    params = AdaptParams(strategy="head", epochs=2, early_stopping_min_rows=1000)
    r = few_shot_accuracy(init, eps, lambda ids: [texts[i] for i in ids], params, max_length=16)
    assert set(r.by_shots) == {1, 2} and set(r.per_episode) == {"e1", "e2"}
    assert all(0.0 <= v <= 100.0 for v in r.per_episode.values())
    assert set(r.metrics()) == {"few_shot_accuracy", "few_shot_accuracy_1shot", "few_shot_accuracy_2shot"}
    again = few_shot_accuracy(init, eps, lambda ids: [texts[i] for i in ids], params, max_length=16)
    assert again.per_episode == r.per_episode  # seeded: the same numbers every time


def test_interleaved_timing_alternates_and_takes_medians(classifier):
    from metaloop.compress.runtime import load_classifier

    folder, test, _, _ = classifier
    calls: list[str] = []

    class Counting:  # a real classifier that records the order it is called in
        def __init__(self, name):
            self.name, self.inner = name, load_classifier(folder)

        def encode(self, texts, pad_to=None):
            return self.inner.encode(texts, pad_to=pad_to)

        def logits(self, enc):
            calls.append(self.name)
            return self.inner.logits(enc)

    out = interleaved_timing({"a": Counting("a"), "b": Counting("b")}, test.texts, rounds=3, seq_len=16,
                             repeats=4, batch_repeats=1)
    assert set(out) == {"a", "b"}
    assert all(0 < v["p50_ms"] <= v["p95_ms"] and v["ms_batch"] > 0 for v in out.values())
    runs = [k for i, k in enumerate(calls) if i == 0 or calls[i - 1] != k]
    assert runs == ["a", "b"] * 3  # a's round, b's round, a's round, ...
