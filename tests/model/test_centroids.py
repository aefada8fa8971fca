"""The nearest-prototype classifier: metrics, class names as support rows, ProtoNet with both."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metaloop.errors import ConfigError
from metaloop.meta import LearnerConfig, build_learner, proto_logits
from metaloop.meta.head import Centroids, label_text, prototypes


def test_label_text_reads_intent_names_as_words():
    assert label_text("credit_limit_change") == "credit limit change"
    assert label_text("book-flight") == "book flight"
    assert label_text("  apr ") == "apr"


def test_class_names_count_as_weighted_support_rows():
    gen = torch.Generator().manual_seed(0)
    z, names = torch.randn(5, 4, generator=gen), torch.randn(2, 4, generator=gen)
    y = torch.tensor([0, 0, 0, 1, 1])
    got = prototypes(z, y, 2, names, label_shots=2.0)
    want = torch.stack([(z[:3].sum(0) + 2 * names[0]) / 5, (z[3:].sum(0) + 2 * names[1]) / 4])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(prototypes(z, y, 2, names, label_shots=0.0), prototypes(z, y, 2))
    # a class with no support row is its name alone
    torch.testing.assert_close(prototypes(z[:3], y[:3], 2, names, 1.0)[1], names[1])


def test_metrics_and_scale():
    gen = torch.Generator().manual_seed(1)
    z, q, y = torch.randn(6, 8, generator=gen), torch.randn(10, 8, generator=gen), torch.tensor([0, 0, 1, 1, 2, 2])
    sq = Centroids()
    torch.testing.assert_close(sq.logits(q, sq.prototypes(z, y, 3)), proto_logits(q, prototypes(z, y, 3)))
    cos = Centroids("cosine", scale=20.0)
    protos = cos.prototypes(z, y, 3)
    torch.testing.assert_close(protos, prototypes(F.normalize(z, dim=-1), y, 3))  # mean of unit vectors
    logits = cos.logits(q, protos)
    torch.testing.assert_close(logits, 20.0 * F.cosine_similarity(q.unsqueeze(1), protos.unsqueeze(0), dim=-1))
    # the scale is a temperature: predictions do not change
    assert torch.equal(logits.argmax(-1), Centroids("cosine", scale=1.0).logits(q, protos).argmax(-1))
    with pytest.raises(ValueError, match="metric"):
        Centroids("manhattan")
    with pytest.raises(ValueError, match="label_z"):
        Centroids(label_shots=1.0).prototypes(z, y, 3)


def test_a_heavy_class_name_makes_the_classifier_zero_shot():
    gen = torch.Generator().manual_seed(2)
    z, q, names = torch.randn(6, 8, generator=gen), torch.randn(20, 8, generator=gen), torch.randn(3, 8, generator=gen)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    c = Centroids("cosine", label_shots=1e6)
    pred = c.logits(q, c.prototypes(z, y, 3, names)).argmax(-1)
    nearest_name = (F.normalize(q, dim=-1) @ F.normalize(names, dim=-1).t()).argmax(-1)
    assert torch.equal(pred, nearest_name)
    # and the names change the answer (or this test could not fail)
    assert not torch.equal(pred, c.logits(q, Centroids("cosine").prototypes(z, y, 3)).argmax(-1))


def test_protonet_with_class_names_needs_them_in_the_batch_and_learns_from_them(tiny, toy_batch):
    model, tok = tiny
    centroids = Centroids("cosine", scale=10.0, label_shots=1.0)
    learner = build_learner(model, LearnerConfig(algorithm="protonet", centroids=centroids))
    assert learner.needs_label_names
    with pytest.raises(ConfigError, match="label_names=True"):
        learner.meta_loss(toy_batch(tok))

    def batch(domain, index):
        return toy_batch(tok, domain=domain, shots=1, queries=3, index=index, label_names=True)

    b = batch("shop", 0)
    assert b.labels is not None and b.labels["input_ids"].shape[0] == b.ways
    # the class names are an input of the loss: give each class another's name and it changes
    from dataclasses import replace

    swapped = replace(b, labels={k: v.roll(1, dims=0) for k, v in b.labels.items()})
    with torch.no_grad():
        assert abs(float(learner.meta_loss(b).loss) - float(learner.meta_loss(swapped).loss)) > 1e-4
    # and meta-training with them lowers the loss on unseen draws
    opt = torch.optim.Adam(learner.meta_parameters(), lr=1e-3)
    train = [batch(d, i) for d in ("shop", "bank", "travel") for i in range(3)]
    fresh = [batch(d, 100 + i) for d in ("shop", "bank", "travel") for i in range(2)]
    start = sum(learner.evaluate(x).loss for x in fresh)
    for _ in range(8):
        for x in train:
            opt.zero_grad()
            learner.outer_backward(x)
            opt.step()
    assert sum(learner.evaluate(x).loss for x in fresh) < 0.8 * start
