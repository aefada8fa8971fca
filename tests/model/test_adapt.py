"""Per-domain adaptation on a tiny random BERT and the toy keyword domains.

Checks: every strategy writes a standalone classifier (AutoModelForSequenceClassification,
label names in its config, safetensors, tokenizer) and trains only what it should; the
prototype head starts as a nearest-centroid classifier; Meta-SGD step sizes saved beside
an init are used; unusable domains fail with a DataError naming domain and labels while
the other domains go on.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from metaloop.adapt import (
    AdaptParams,
    Examples,
    adapt_domain,
    adapt_domains,
    centroid_accuracy,
    domain_data,
    fit,
    load_for_classification,
    pooled_features,
    prototype_init,
)
from metaloop.backbone import tiny_bert
from metaloop.errors import DataError

torch.set_num_threads(1)
FAST = {"epochs": 25, "lr": 3e-3, "lora_lr": 1e-2, "head_lr": 3e-2, "batch_size": 16}
TOPICS = {  # domain -> label -> the keywords that tell it apart
    "shop": {"refund": "refund money back", "track": "where parcel track", "cancel": "cancel order stop",
             "size": "size fit small"},
    "bank": {"loan": "loan borrow rate", "card": "card lost stolen", "fee": "fee charge why",
             "open": "open new account"},
}
FILLER = ["please", "i", "you", "the", "a", "my", "can", "help", "need", "today", "now", "hi", "thanks"]


def toy_table(per_label: int = 12, seed: int = 0) -> pd.DataFrame:
    """Keyword-separable rows; every 4th row of a label is a test row."""
    rng = random.Random(seed)
    rows = []
    for domain, labels in TOPICS.items():
        for label, keys in labels.items():
            for i in range(per_label):
                text = " ".join(rng.sample(keys.split(), 2) + rng.sample(FILLER, 2))
                rows.append({"id": f"{domain}-{label}-{i}", "text": text, "label": label, "domain": domain,
                             "split": "test" if i % 4 == 0 else "train", "source": "toy"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-encoder")
    tiny_bert(folder)
    return folder


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return toy_table()


def _train_acc(model_dir, data: Examples) -> float:
    from metaloop.compress.runtime import load_classifier

    clf = load_classifier(model_dir, max_length=32)
    pred = clf.predict(data.texts)
    return sum(p == y for p, y in zip(pred, data.labels)) / len(pred)


@pytest.mark.parametrize("strategy", ["full", "top_k", "head", "lora"])
def test_each_strategy_writes_a_standalone_classifier(tmp_path, tiny_dir, table, strategy):
    params = AdaptParams(strategy=strategy, top_k=1, early_stopping_min_rows=1000, **FAST)
    out = tmp_path / "shop"
    result = adapt_domain(tiny_dir, table, "shop", params, out, max_length=32)

    assert {"config.json", "model.safetensors", "tokenizer.json", "metaloop.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert [model.config.id2label[i] for i in range(4)] == ["cancel", "refund", "size", "track"]
    assert model.config.label2id == {"cancel": 0, "refund": 1, "size": 2, "track": 3}
    assert result.labels == ["cancel", "refund", "size", "track"] and result.n_train == 36
    # LoRA is merged: the saved model is the base architecture, nothing of peft left
    assert not any("lora" in k for k in load_file(str(out / "model.safetensors")))

    start, tok = load_for_classification(tiny_dir, result.labels)
    init = start.state_dict()
    saved = model.state_dict()
    # the trained classifier is saved (for lora: peft's trained copy, not the frozen original)
    prototype_init(start, tok, domain_data(table, "shop", params).train, result.labels, 32)
    assert not torch.equal(saved["classifier.weight"], start.state_dict()["classifier.weight"])
    changed = {k for k in init if not k.startswith("classifier") and not torch.equal(init[k], saved[k])}
    if strategy == "head":
        assert changed <= {k for k in init if ".pooler." in k}
    elif strategy == "top_k":
        assert changed and all(".layer.1." in k or ".pooler." in k for k in changed)
    elif strategy == "lora":  # adapters merged into attention projections only
        assert changed and all(".attention." in k or ".pooler." in k for k in changed)
    else:
        assert any("embeddings" in k for k in changed)
    history = json.loads((out / "metaloop.json").read_text())["history"]
    assert history["train_loss"][-1] < history["train_loss"][0]
    if strategy == "full":  # the tiny random encoder must move to separate the keywords
        data = domain_data(table, "shop", params)
        assert _train_acc(out, data.train) >= 0.75


def test_prototype_head_starts_as_nearest_centroid(tiny_dir, table):
    data = domain_data(table, "bank", AdaptParams())
    model, tok = load_for_classification(tiny_dir, data.labels)
    prototype_init(model, tok, data.train, data.labels, 32)
    z = pooled_features(model, tok, data.train.texts, 32)
    y = torch.tensor([data.labels.index(lab) for lab in data.train.labels])
    centroids = torch.stack([z[y == k].mean(0) for k in range(len(data.labels))])
    nearest = torch.cdist(z, centroids).argmin(-1)
    with torch.no_grad():
        from metaloop.adapt import encode

        logits = model.eval()(**encode(tok, data.train.texts, 32)).logits
    assert torch.equal(logits.argmax(-1), nearest)


def test_centroid_accuracy_is_the_mean_pooled_nearest_centroid(tiny_dir, table):
    """Each training row is its own class: its centroid is itself, so it is always nearest
    (distinct texts, distinct embeddings). Rotate the test labels and every prediction is wrong."""
    data = domain_data(table, "bank", AdaptParams())
    rows = data.train.texts[:6]
    labels = [f"c{i}" for i in range(len(rows))]
    own = Examples(rows, labels)
    assert centroid_accuracy(tiny_dir, own, own, labels, 32) == 1.0
    shifted = Examples(rows, labels[1:] + labels[:1])
    assert centroid_accuracy(tiny_dir, own, shifted, labels, 32) == 0.0


def test_centroid_accuracy_uses_class_names_when_meta_training_did(tiny_dir, table):
    """Name each class after one row's text and train on the rotated labels: the support alone is
    always wrong, the names alone (label_shots overwhelming) always right."""
    from metaloop.meta.head import Centroids, label_text

    data = domain_data(table, "bank", AdaptParams())
    rows = list(dict.fromkeys(label_text(t) for t in data.train.texts))[:6]
    names = list(rows)
    misleading = Examples(rows, names[1:] + names[:1])
    truth = Examples(rows, names)
    assert centroid_accuracy(tiny_dir, misleading, truth, names, 32) == 0.0
    by_name = Centroids("cosine", label_shots=1e6)
    assert centroid_accuracy(tiny_dir, misleading, truth, names, 32, centroids=by_name) == 1.0


def test_centroid_accuracy_waits_for_another_threads_training_block(tiny_dir, table, monkeypatch):
    """In the flow's `threads` runner one domain may time its latency (under the same lock)
    while another computes its accuracy before adaptation: that must not run inside the
    other's training or timing block."""
    import threading

    from metaloop.adapt import seeded

    import metaloop.adapt.torch_state as torch_state

    data = domain_data(table, "bank", AdaptParams())
    rows = data.train.texts[:6]
    own = Examples(rows, [f"c{i}" for i in range(len(rows))])
    inside, release, settled, done = threading.Event(), threading.Event(), threading.Event(), []

    class Observed:
        """The module's lock, seen from outside: `contended` is set when a thread finds it held
        by another and starts to wait. Same semantics (a real RLock underneath)."""

        def __init__(self, lock):
            self.lock, self.contended = lock, threading.Event()

        def __enter__(self):
            if not self.lock.acquire(blocking=False):
                self.contended.set()
                settled.set()
                self.lock.acquire()
            return self

        def __exit__(self, *exc):
            self.lock.release()

    lock = Observed(torch_state.TORCH_STATE)
    monkeypatch.setattr(torch_state, "TORCH_STATE", lock)

    def training_block():
        with seeded(0, threads=1):
            inside.set()
            release.wait(60)

    def scoring():
        try:
            done.append(centroid_accuracy(tiny_dir, own, own, own.labels, 32))
        finally:
            settled.set()  # finished (or failed) without waiting: the case this test catches

    trainer = threading.Thread(target=training_block)
    trainer.start()
    assert inside.wait(60)
    scorer = threading.Thread(target=scoring)
    scorer.start()
    # No clock: wait until the scorer either waits for the lock or is done without it.
    assert settled.wait(120)
    waited, finished_inside = lock.contended.is_set(), list(done)
    release.set()
    trainer.join(60)
    scorer.join(120)
    assert waited and finished_inside == [], "centroid_accuracy ran inside another thread's training block"
    assert done == [1.0]


def test_meta_sgd_step_sizes_from_the_init_are_used(tmp_path, tiny_dir, table):
    init = tmp_path / "init"
    shutil.copytree(tiny_dir, init)
    frozen = "encoder.layer.0.attention.self.query.weight"  # encoder (AutoModel) name, as meta-training saves it
    moved = "encoder.layer.1.attention.self.query.weight"
    save_file({frozen: torch.zeros(32, 32), moved: torch.full((32, 32), 0.05),
               "head.weight": torch.full((32,), 0.05), "head.bias": torch.tensor(0.05)},
              str(init / "meta_sgd_lrs.safetensors"))
    data = domain_data(table, "shop", AdaptParams())
    start = load_for_classification(init, data.labels)[0].state_dict()

    with_lrs, _, hist = fit(init, data.train, data.labels, AdaptParams(**{**FAST, "epochs": 3}), max_length=32)
    assert hist.learned_lrs == 4
    after = with_lrs.state_dict()
    assert torch.equal(after["bert." + frozen], start["bert." + frozen])  # step size 0: untouched
    assert not torch.equal(after["bert." + moved], start["bert." + moved])

    without, _, hist = fit(init, data.train, data.labels,
                           AdaptParams(**{**FAST, "epochs": 3}, learned_lrs=False), max_length=32)
    assert hist.learned_lrs == 0
    assert not torch.equal(without.state_dict()["bert." + frozen], start["bert." + frozen])


@pytest.mark.parametrize("classifier", ["linear", "centroids"])
def test_soup_is_the_mean_of_its_members_weights(tiny_dir, table, classifier):
    from metaloop.meta.head import Centroids

    data = domain_data(table, "shop", AdaptParams())
    one = AdaptParams(**{**FAST, "epochs": 3}, classifier=classifier, holdout_fraction=0.0)
    kw = {"max_length": 32, "centroids": Centroids("cosine", 10.0, 1.0) if classifier == "centroids" else None}
    members = [fit(tiny_dir, data.train, data.labels, one, seed=s, **kw)[0].state_dict() for s in (13, 14, 15)]
    soup, _, hist = fit(tiny_dir, data.train, data.labels, one.model_copy(update={"soup": 3}), seed=13, **kw)
    assert hist.soup == 3
    averaged = 0
    for k, v in soup.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, sum(m[k] for m in members) / 3, atol=1e-6, rtol=1e-5)
            averaged += not torch.equal(members[0][k], members[1][k])
    assert averaged > 10  # the members differ (seeded batches), so the soup is not a copy of one


def test_soup_with_early_stopping_averages_each_members_best_epoch(tiny_dir, table):
    """Members may stop at different epochs; each keeps its own best one, the soup is their
    mean, and the history's held-out accuracy is the soup's own."""
    from metaloop.adapt import accuracy

    data = domain_data(table, "shop", AdaptParams(holdout_fraction=0.25, early_stopping_min_rows=8))
    one = AdaptParams(**{**FAST, "epochs": 8}, patience=1)
    kw = {"val": data.val, "max_length": 32}
    fitted = [fit(tiny_dir, data.train, data.labels, one, seed=s, **kw) for s in (13, 14)]
    assert all(h.stopped_early for _, _, h in fitted)
    assert fitted[0][2].best_epoch != fitted[1][2].best_epoch  # the case this test is about
    soup, tok, hist = fit(tiny_dir, data.train, data.labels, one.model_copy(update={"soup": 2}), seed=13, **kw)
    for k, v in soup.state_dict().items():
        if v.is_floating_point():
            mean = sum(m.state_dict()[k] for m, _, _ in fitted) / 2
            torch.testing.assert_close(v, mean, atol=1e-6, rtol=1e-5)
    assert hist.soup == 2 and hist.best_epoch == fitted[0][2].best_epoch
    assert hist.soup_val_accuracy == accuracy(soup, tok, data.val, data.labels, 32)[0]


def test_early_stopping_uses_val_rows_or_a_holdout(table):
    t = table.copy()
    data = domain_data(t, "shop", AdaptParams(holdout_fraction=0.25, early_stopping_min_rows=8))
    assert data.val_source == "train holdout" and len(data.val) == 8 and len(data.train) == 28
    # Every train row goes to exactly one side: as a multiset, the holdout plus the training
    # rows are the domain's train rows, so no row is in both (and none is lost). Counting copies
    # stays exact when a text is repeated; this table's texts are distinct, so the two sides'
    # texts must also be disjoint outright.
    shop_train = t[(t.domain == "shop") & (t.split == "train")]
    assert shop_train["text"].is_unique
    assert Counter(data.val.texts) + Counter(data.train.texts) == Counter(shop_train["text"])
    assert not set(data.val.texts) & set(data.train.texts)
    assert all(Counter(data.val.labels)[lab] == 2 for lab in data.labels)  # int(9 * 0.25) per label
    # A repeated text (two train rows, one text): the copies still add up, one row one side.
    dup = pd.concat([t, shop_train.iloc[[0]]], ignore_index=True)
    again = domain_data(dup, "shop", AdaptParams(holdout_fraction=0.25, early_stopping_min_rows=8))
    rows = dup.loc[(dup.domain == "shop") & (dup.split == "train"), "text"]
    assert Counter(again.val.texts) + Counter(again.train.texts) == Counter(rows)
    assert domain_data(t, "shop", AdaptParams(early_stopping_min_rows=1000)).val is None
    t.loc[(t.domain == "shop") & (t.index % 4 == 1), "split"] = "val"
    data = domain_data(t, "shop", AdaptParams(early_stopping_min_rows=8))
    assert data.val_source == "val split" and len(data.val) == 12


def test_too_few_examples_names_domain_and_labels(table):
    with pytest.raises(DataError) as err:
        domain_data(table, "shop", AdaptParams(shots=20))
    msg = str(err.value)
    assert "'shop'" in msg and "cancel" in msg and "shots=20" in msg


def test_labels_unknown_to_the_eval_set_name_them(table):
    with pytest.raises(DataError) as err:
        domain_data(table, "shop", AdaptParams(), eval_labels=["cancel", "refund", "size", "warranty"])
    msg = str(err.value)
    assert "'shop'" in msg and "track" in msg and "warranty" in msg


def test_a_bad_domain_does_not_stop_the_others(tmp_path, tiny_dir, table):
    params = AdaptParams(strategy="head", epochs=1, early_stopping_min_rows=1000)
    outcome = adapt_domains(
        tiny_dir, table, ["shop", "nowhere", "bank"], params, tmp_path,
        eval_labels={"bank": ["card", "fee", "loan", "mortgage"]}, max_length=32,
    )
    assert set(outcome.results) == {"shop"}
    assert set(outcome.errors) == {"nowhere", "bank"} and not outcome.ok
    assert "mortgage" in outcome.errors["bank"] and "open" in outcome.errors["bank"]
    assert (tmp_path / "shop" / "model.safetensors").is_file() and not (tmp_path / "bank").exists()


def test_concurrent_fits_in_one_process_give_the_sequential_result(tmp_path, table):
    """The flow's threads task runner adapts two domains at once in one process. torch's RNG
    (dropout) and thread count are process-wide, so without care the two fits interleave their
    dropout draws and a domain's model depends on the other's timing."""
    from concurrent.futures import ThreadPoolExecutor

    folder = tmp_path / "tiny-dropout"
    tiny_bert(folder, dropout=0.1)
    params = AdaptParams(**{**FAST, "epochs": 8}, holdout_fraction=0.0, threads=1)

    def one(domain: str) -> dict[str, torch.Tensor]:
        data = domain_data(table, domain, params)
        model, _, _ = fit(folder, data.train, data.labels, params, max_length=32)
        return {k: v.clone() for k, v in model.state_dict().items()}

    alone = {d: one(d) for d in ("shop", "bank")}
    for _ in range(2):
        with ThreadPoolExecutor(2) as pool:
            together = dict(zip(("shop", "bank"), pool.map(one, ("shop", "bank"))))
        for d in alone:
            for k, v in alone[d].items():
                assert torch.equal(v, together[d][k]), f"{d}: {k} differs when fitted beside another domain"
