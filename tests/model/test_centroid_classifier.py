"""The centroid classifier as a production model (adapt.classifier: centroids), tiny random BERT.

Checks: before any step its logits are the centroid rule's (mean-pooled encoder, class names
as support rows); adaptation trains it and saves a folder that loads from disk alone with
the same logits, whose encoder `AutoModel` reads; `head` trains the class vectors only;
every compression step (distill, prune, trim_vocab, int8 in ONNX and in torch) keeps its
predictions and leaves the class vectors in fp32; misuse is refused with the fix named.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file
from test_compress import PARAMS, toy_table, wordy_encoder
from transformers import AutoModel, AutoTokenizer

from metaloop.adapt import (
    AdaptParams,
    adapt_domain,
    domain_data,
    encode,
    fit,
    load_for_classification,
    predict_logits,
    prototype_init,
)
from metaloop.centroid_classifier import CentroidClassifier
from metaloop.compress import compress, load_classifier
from metaloop.errors import ConfigError
from metaloop.meta.head import Centroids, label_text
from metaloop.meta.pooling import pool

torch.set_num_threads(1)
RULE = Centroids("cosine", 20.0, 1.0)
FAST = {"epochs": 30, "lr": 3e-3, "head_lr": 3e-2, "batch_size": 16, "early_stopping_min_rows": 1000}


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    return wordy_encoder(tmp_path_factory.mktemp("centroid") / "init")


@pytest.fixture(scope="module")
def adapted(init, tmp_path_factory):
    """(folder, domain data): the toy domain adapted with classifier centroids."""
    out = tmp_path_factory.mktemp("centroid-adapted") / "shop"
    params = AdaptParams(classifier="centroids", **FAST)
    adapt_domain(init, toy_table(), "shop", params, out, max_length=32, centroids=RULE)
    return out, domain_data(toy_table(), "shop", params)


def _test_texts() -> list[str]:
    t = toy_table()
    return t[t["split"] == "test"]["text"].tolist()


def _embed(folder, texts):
    model, tok = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        enc = encode(tok, texts, 32)
        return pool(model(**enc).last_hidden_state, enc["attention_mask"], "mean")


def test_starts_as_the_centroid_rule_with_class_names(init):
    data = domain_data(toy_table(), "shop", AdaptParams())
    model, tok = load_for_classification(init, data.labels, centroids=RULE)
    assert isinstance(model, CentroidClassifier)
    prototype_init(model, tok, data.train, data.labels, 32)
    z, names = _embed(init, data.train.texts), _embed(init, [label_text(n) for n in data.labels])
    y = torch.tensor([data.labels.index(lab) for lab in data.train.labels])
    expected = torch.stack([(F.normalize(z[y == k], dim=-1).sum(0) + F.normalize(names[k], dim=-1)) / ((y == k).sum() + 1)
                            for k in range(len(data.labels))])
    assert torch.allclose(model.centroids.weight, expected, atol=1e-5)
    logits = predict_logits(model, tok, _test_texts(), 32)
    assert torch.allclose(logits, RULE.logits(_embed(init, _test_texts()), expected), atol=1e-4)


def test_adapted_folder_loads_alone_with_the_same_logits(adapted, tmp_path):
    folder, data = adapted
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)
    clf = load_classifier(moved)
    assert clf.labels == ["cancel", "refund", "size", "track"]
    assert float(np.mean(np.array(clf.predict(data.train.texts)) == np.array(data.train.labels))) >= 0.9
    keys = set(load_file(str(moved / "model.safetensors")))
    assert "centroids.weight" in keys and not any("pooler" in k or "classifier" in k for k in keys)
    config = json.loads((moved / "config.json").read_text())
    assert config["metaloop_classifier"] == {"metric": "cosine", "scale": 20.0, "label_shots": 1.0, "pooling": "mean"}
    sidecar = json.loads((moved / "metaloop.json").read_text())
    assert sidecar["classifier"] == "centroids" and sidecar["history"]["train_loss"][-1] < sidecar["history"]["train_loss"][0]
    # the encoder alone loads with AutoModel; its mean-pooled embedding + the saved vectors give the logits
    w = load_file(str(moved / "model.safetensors"))["centroids.weight"]
    texts = _test_texts()
    expected = RULE.logits(_embed(moved, texts), w)
    got = clf.logits(clf.encode(texts))
    assert np.allclose(got, expected.numpy(), atol=1e-4)


def test_names_are_training_rows_and_head_strategy_trains_class_vectors_only(init):
    data = domain_data(toy_table(), "shop", AdaptParams())
    params = AdaptParams(classifier="centroids", strategy="head", **{**FAST, "epochs": 2, "batch_size": 8})
    start, _ = load_for_classification(init, data.labels, centroids=RULE)
    model, _, hist = fit(init, data.train, data.labels, params, max_length=32, centroids=RULE)
    # 72 rows + 4 names in batches of 8: 10 steps an epoch (the rows alone would take 9)
    assert len(data.train) == 72 and hist.steps == 2 * 10 and hist.trainable_params == model.centroids.weight.numel()
    before, after = start.state_dict(), model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"centroids.weight"}


@pytest.mark.parametrize("recipe", ["small", "int8_torch"])
def test_compression_keeps_predictions_and_fp32_class_vectors(adapted, tmp_path, recipe):
    folder, data = adapted
    params = PARAMS
    if recipe == "int8_torch":
        params = PARAMS.model_copy(update={"int8": PARAMS.int8.model_copy(update={"backend": "torch"})})
    teacher = load_classifier(folder).predict_ids(data.train.texts)
    result = compress(folder, tmp_path / recipe, "int8" if recipe == "int8_torch" else recipe, params,
                      train=data.train, max_length=32)
    clf = load_classifier(tmp_path / recipe)
    agree = float(np.mean(clf.predict_ids(data.train.texts) == teacher))
    assert agree >= 0.8 and result.agreement_train == pytest.approx(agree)
    meta = json.loads((tmp_path / recipe / "metaloop.json").read_text())
    if recipe == "small":
        assert meta["format"] == "onnx" and result.params_after < result.params_before
    else:
        assert meta["format"] == "torch-int8" and "centroids" not in meta["quantized"]
        assert load_file(str(tmp_path / recipe / "model.safetensors"))["centroids.weight"].dtype == torch.float32


def test_misuse_is_refused_with_the_fix(init):
    data = domain_data(toy_table(), "shop", AdaptParams())
    with pytest.raises(ConfigError, match="centroids=params.meta.centroids"):
        fit(init, data.train, data.labels, AdaptParams(classifier="centroids"), max_length=32)
    with pytest.raises(ValidationError, match="lora"):
        AdaptParams(classifier="centroids", strategy="lora")
