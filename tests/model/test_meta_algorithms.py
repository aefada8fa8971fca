"""Properties of the six meta-learning algorithms on a tiny random BERT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metaloop.meta import LearnerConfig, build_learner, head_logits, proto_head, query_logits
from metaloop.meta.encoder import attention_for


def _grads(learner, loss):
    params = learner.meta_parameters()
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def _learner(model, **cfg):
    return build_learner(model, LearnerConfig(**cfg))


def test_maml_second_order_gradient_matches_finite_differences(tiny, toy_batch):
    model, tok = tiny
    batch = toy_batch(tok)
    learner = _learner(model.double(), algorithm="maml", inner_steps=2, inner_lr=0.5)
    fo = _learner(learner.encoder.model, algorithm="fomaml", inner_steps=2, inner_lr=0.5)
    params = learner.meta_parameters()
    grads = _grads(learner, learner.meta_loss(batch).loss)
    fo_grads = _grads(fo, fo.meta_loss(batch).loss)
    gen = torch.Generator().manual_seed(0)
    eps = 1e-6
    for _ in range(3):
        v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        with torch.no_grad():
            for p, d in zip(params, v):
                p.add_(d, alpha=eps)
        up = float(learner.meta_loss(batch).loss.detach())
        with torch.no_grad():
            for p, d in zip(params, v):
                p.sub_(d, alpha=2 * eps)
        down = float(learner.meta_loss(batch).loss.detach())
        with torch.no_grad():
            for p, d in zip(params, v):
                p.add_(d, alpha=eps)
        numeric = (up - down) / (2 * eps)
        analytic = float(sum((g * d).sum() for g, d in zip(grads, v)))
        first_order = float(sum((g * d).sum() for g, d in zip(fo_grads, v)))
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)
        # the check has teeth: dropping the second-order term is visibly wrong
        assert abs(first_order - numeric) > 1e-3 * abs(numeric)


def test_fomaml_equals_maml_without_the_second_order_term(tiny, toy_batch):
    model, tok = tiny
    batch = toy_batch(tok, ways=4)
    lr = 0.5
    maml = _learner(model.double(), algorithm="maml", inner_steps=1, inner_lr=lr)
    fomaml = _learner(maml.encoder.model, algorithm="fomaml", inner_steps=1, inner_lr=lr)
    g2 = _grads(maml, maml.meta_loss(batch).loss)
    g1 = _grads(fomaml, fomaml.meta_loss(batch).loss)

    # The dropped term, computed independently with torch.func:
    #   -lr * d/dtheta [ grad_phi L_s(phi) |_{phi = phi0(theta)} . u ],
    # phi = (encoder weights, head), phi0(theta) = (theta, prototype head of theta), and
    # u = dL_q/d(adapted weights) held constant.
    enc = maml.encoder
    theta = maml.meta_parameters()
    names = [n for n, p in enc.named_weights().items() if p.requires_grad]
    adapted = maml.adapt(batch, create_graph=False, detach_meta=False)
    lq = F.cross_entropy(query_logits(enc, batch.query, adapted), batch.query_y)
    fast = [adapted.encoder[n] for n in names] + [adapted.head["weight"], adapted.head["bias"]]
    u = [torch.zeros_like(f) if g is None else g.detach()
         for f, g in zip(fast, torch.autograd.grad(lq, fast, allow_unused=True))]

    def support_loss(weights, w, b):
        return F.cross_entropy(head_logits({"weight": w, "bias": b}, enc(batch.support, weights)), batch.support_y)

    with attention_for(True):
        head0 = proto_head(enc(batch.support), batch.support_y, batch.ways)
        g_enc, g_w, g_b = torch.func.grad(support_loss, argnums=(0, 1, 2))(
            dict(zip(names, theta)), head0["weight"], head0["bias"])
        gs = [g_enc[n] for n in names] + [g_w, g_b]
        dot = sum((g * ui).sum() for g, ui in zip(gs, u))
        term = torch.autograd.grad(dot, theta, allow_unused=True)
    term = [torch.zeros_like(p) if t is None else t for p, t in zip(theta, term)]
    diff = max(float((a - b).abs().max()) for a, b in zip(g2, g1))
    assert diff > 1e-6  # the second-order term is not negligible here
    for a, b, t in zip(g2, g1, term):
        torch.testing.assert_close(a, b - lr * t, rtol=1e-7, atol=1e-10)


def test_reptile_moves_parameters_toward_the_adapted_ones(tiny, toy_batch):
    model, tok = tiny
    batch = toy_batch(tok)
    learner = _learner(model, algorithm="reptile", inner_steps=3, inner_lr=0.1)
    before = {n: p.detach().clone() for n, p in learner.encoder.named_weights().items()}
    adapted = learner.adapt(batch)
    learner.outer_backward(batch, weight=1.0)
    opt = torch.optim.SGD(learner.meta_parameters(), lr=0.25)
    opt.step()
    moved = 0
    for n, p in learner.encoder.named_weights().items():
        target = adapted.encoder[n].detach()
        dist_before = (before[n] - target).norm()
        if dist_before > 0:
            moved += 1
            torch.testing.assert_close(p.detach() - before[n], 0.25 * (target - before[n]))
            assert (p.detach() - target).norm() < dist_before
    assert moved > 10


def test_protonet_loss_decreases_on_separable_episodes(tiny, toy_batch):
    model, tok = tiny
    learner = _learner(model, algorithm="protonet")
    opt = torch.optim.Adam(learner.meta_parameters(), lr=1e-3)
    domains = ("shop", "bank", "travel")
    batches = [toy_batch(tok, domain=d, index=i) for d in domains for i in range(3)]
    fresh = [toy_batch(tok, domain=d, index=100 + i) for d in domains for i in range(2)]  # unseen draws
    start = sum(learner.evaluate(b).loss for b in fresh)
    losses = []
    for _ in range(8):
        epoch = 0.0
        for b in batches:
            opt.zero_grad()
            epoch += learner.outer_backward(b).loss
            opt.step()
        losses.append(epoch)
    end = sum(learner.evaluate(b).loss for b in fresh)
    assert losses[-1] < 0.5 * losses[0]
    assert end < 0.8 * start


@pytest.mark.parametrize("first_order", [False, True])
def test_metasgd_learning_rates_get_gradients(tiny, toy_batch, first_order):
    model, tok = tiny
    learner = _learner(model, algorithm="metasgd", inner_steps=2, first_order=first_order)
    assert set(learner.learned_lrs()) == set(learner.adapt_names) | {"head.weight", "head.bias"}
    learner.outer_backward(toy_batch(tok))
    lrs = [p for k, p in learner.lrs.items() if "pooler" not in k]  # the pooler is unused
    assert all(p.grad is not None for p in lrs)
    assert sum(int(p.grad.abs().sum() > 0) for p in lrs) > len(lrs) // 2
    assert learner.lrs["head__weight"].shape == (model.config.hidden_size,)


def test_anil_adapts_only_the_head_but_meta_learns_the_encoder(tiny, toy_batch):
    model, tok = tiny
    batch = toy_batch(tok)
    learner = _learner(model, algorithm="anil", adapt="all", inner_steps=3, inner_lr=0.5)
    assert learner.adapt_names == []
    adapted = learner.adapt(batch)
    assert adapted.encoder == {}
    assert adapted.support_losses[-1] < adapted.support_losses[0]  # the head did adapt
    learner.outer_backward(batch)
    layer0 = model.encoder.layer[0].attention.self.query.weight
    assert layer0.grad is not None and layer0.grad.abs().sum() > 0


def test_top_k_scope_adapts_only_the_top_layers(tiny, toy_batch):
    model, tok = tiny
    learner = _learner(model, algorithm="maml", adapt="top_k", top_k=1, inner_steps=2, inner_lr=0.5)
    assert learner.adapt_names and all(".layer.1." in n for n in learner.adapt_names)
    batch = toy_batch(tok)
    adapted = learner.adapt(batch)
    weights = learner.encoder.named_weights()
    assert set(adapted.encoder) == set(learner.adapt_names)
    assert any(not torch.equal(adapted.encoder[n], weights[n]) for n in learner.adapt_names)
    learner.outer_backward(batch)
    assert weights["encoder.layer.0.output.dense.weight"].grad.abs().sum() > 0  # lower layers still meta-learn


def test_top_k_larger_than_depth_is_a_config_error(tiny):
    from metaloop.errors import ConfigError

    with pytest.raises(ConfigError, match="top_k"):
        _learner(tiny[0], algorithm="maml", adapt="top_k", top_k=5)


def test_reptile_refuses_lora_and_head_scopes(tiny):
    from metaloop.errors import ConfigError

    for scope in ("lora", "head"):
        with pytest.raises(ConfigError, match="reptile"):
            _learner(tiny[0], algorithm="reptile", adapt=scope)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "metasgd"])
def test_lora_scope_adapts_adapters_and_exports_a_plain_encoder(tiny, toy_batch, tmp_path, algorithm):
    from transformers import AutoModel

    from metaloop.meta.checkpoint import export_model

    model, tok = tiny
    learner = _learner(model, algorithm=algorithm, adapt="lora", lora_rank=2, inner_steps=2, inner_lr=0.5)
    assert learner.adapt_names and all(".lora_A." in n or ".lora_B." in n for n in learner.adapt_names)
    batch = toy_batch(tok)
    adapted = learner.adapt(batch)
    weights = learner.encoder.named_weights()
    assert any(not torch.equal(adapted.encoder[n], weights[n]) for n in learner.adapt_names if "lora_B" in n)
    learner.outer_backward(batch)  # lora_B is frozen (zero start), must not raise
    assert all(weights[n].grad is None for n in weights if ".lora_B." in n)
    trained = [n for n in weights if weights[n].grad is not None and weights[n].grad.abs().sum() > 0]
    assert any(".lora_A." in n for n in trained)
    export_model(learner, tok, tmp_path / "model", {})
    plain = AutoModel.from_pretrained(tmp_path / "model")
    assert not any("lora" in n for n, _ in plain.named_parameters())
    assert (tmp_path / "model" / "lora_adapter" / "adapter_config.json").is_file()
    x = {k: v for k, v in batch.query.items()}
    with torch.no_grad():
        learner.eval()
        torch.testing.assert_close(plain(**x).last_hidden_state, learner.encoder.model(**x).last_hidden_state)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "metasgd", "anil", "reptile", "protonet"])
def test_frozen_and_unused_parameters_do_not_raise(tiny, toy_batch, algorithm):
    model, tok = tiny
    model.embeddings.requires_grad_(False)  # frozen; the pooler is unused by mean pooling
    learner = _learner(model, algorithm=algorithm, adapt="all", inner_steps=2)
    batch = toy_batch(tok)
    learner.outer_backward(batch)
    learner.evaluate(batch)
    assert model.embeddings.word_embeddings.weight.grad is None
    assert model.encoder.layer[1].output.dense.weight.grad is not None


@pytest.mark.parametrize("algorithm", ["maml", "protonet", "metasgd"])
def test_any_number_of_ways(tiny, toy_batch, algorithm):
    model, tok = tiny
    learner = _learner(model, algorithm=algorithm, inner_steps=1)
    for ways in (2, 4):
        out = learner.outer_backward(toy_batch(tok, ways=ways))
        assert out.loss == out.loss and 0.0 <= out.acc <= 1.0


@pytest.mark.parametrize("algorithm", ["fomaml", "maml", "metasgd", "anil"])
def test_evaluation_adapts_exactly_like_training(tiny, toy_batch, algorithm):
    model, tok = tiny
    learner = _learner(model, algorithm=algorithm, inner_steps=3, inner_lr=0.05)
    batch = toy_batch(tok)
    trained = float(learner.meta_loss(batch).loss.detach())
    assert learner.evaluate(batch).loss == pytest.approx(trained, rel=1e-4)


def _maml_grads(model, batch, **cfg):
    learner = _learner(model, algorithm="maml", inner_steps=2, inner_lr=0.5, **cfg)
    return learner, _grads(learner, learner.meta_loss(batch).loss)


def test_frozen_prefix_computed_once_gives_the_same_meta_gradient(tiny, toy_batch):
    model, tok = tiny
    batch = toy_batch(tok)
    model = model.double()
    learner, fast = _maml_grads(model, batch, adapt="top_k", top_k=1)
    assert learner.encoder.split_point(learner.adapt_names) == 1
    learner.encoder._stack = None  # force the whole-model path
    slow = _grads(learner, learner.meta_loss(batch).loss)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _outer_grads(learner, batch) -> list[torch.Tensor]:
    learner.zero_grad(set_to_none=True)
    learner.outer_backward(batch)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in learner.meta_parameters()]
    learner.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize(("algorithm", "adapt"), [("maml", "all"), ("maml", "top_k"), ("fomaml", "all"),
                                                  ("metasgd", "all"), ("protonet", "all")])
@pytest.mark.parametrize("inner_steps", [1, 3])
def test_checkpointing_gives_the_same_meta_gradient(tiny, toy_batch, algorithm, adapt, inner_steps):
    model, tok = tiny
    batch = toy_batch(tok)
    model = model.double()
    cfg = {"algorithm": algorithm, "adapt": adapt, "top_k": 1, "inner_steps": inner_steps, "inner_lr": 0.5}
    plain_learner = _learner(model, **cfg)
    plain = _outer_grads(plain_learner, batch)
    learner = _learner(model, checkpointing=True, **cfg)
    # second order: whole inner steps are replayed; otherwise layer activations are recomputed
    assert learner.checkpoint_steps == (algorithm in ("maml", "metasgd"))
    assert learner.encoder.checkpointing != learner.checkpoint_steps
    assert len(learner.adapt(batch).support_losses) == inner_steps
    for a, b in zip(plain, _outer_grads(learner, batch)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert any(float(g.abs().sum()) > 0 for g in plain)


def test_maml_family_reads_class_names_as_support_rows(tiny):
    """label_shots > 0: each name joins the support set (round(label_shots) times) with its class,
    so the Proto-MAML head starts at prototypes that include it; ProtoNet weighs names itself."""
    from metaloop.episodes import FromDomains, KShots, NWays, Pool, Recipe, RemapLabels
    import pandas as pd

    from metaloop.meta.data import episode_batch, tokenize
    from metaloop.meta.head import Centroids, label_text

    model, tok = tiny
    pool = Pool(pd.DataFrame([{"id": f"{lab}-{i}", "text": f"{words} please {i}", "label": lab, "domain": "shop",
                               "split": "train", "source": "toy"}
                              for lab, words in (("refund", "refund money"), ("track", "parcel track"),
                                                 ("cancel", "cancel order")) for i in range(4)]))
    ep = Recipe([FromDomains(["shop"]), NWays(3), KShots(2, queries=2), RemapLabels()]).sample(pool, 0, 0)
    for shots, times in ((1.0, 1), (2.0, 2), (0.4, 1), (0.0, 0)):
        maml = _learner(model, algorithm="maml", centroids=Centroids("cosine", 20.0, shots))
        assert maml.names_in_support == times
    assert _learner(model, algorithm="protonet", centroids=Centroids("cosine", 20.0, 1.0)).names_in_support == 0

    plain = episode_batch(ep, pool.texts, tok, 32)
    named = episode_batch(ep, pool.texts, tok, 32, names_in_support=2)
    assert named.support["input_ids"].shape[0] == plain.support["input_ids"].shape[0] + 2 * ep.ways
    assert named.support_y.tolist() == list(ep.support_y) + list(range(ep.ways)) * 2
    learner = _learner(model, algorithm="maml", inner_steps=0, centroids=Centroids("cosine", 20.0, 2.0))
    head = learner.adapt(named).head
    texts = pool.texts(ep.support_ids) + [label_text(n) for n in ep.labels] * 2
    with torch.no_grad():
        z = learner.encoder(tokenize(tok, texts, 32))
    expected = proto_head(z, named.support_y, ep.ways)
    assert torch.allclose(head["weight"], expected["weight"], atol=1e-5)
    assert not torch.allclose(head["weight"], proto_head(z[: len(ep.support_ids)], plain.support_y, ep.ways)["weight"],
                              atol=1e-3)
