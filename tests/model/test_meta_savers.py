"""Savers of memory and work that must not change the math: the episode vocabulary, chunked
query losses, replayed inner steps (see test_meta_algorithms) and length groups."""

from __future__ import annotations

import pytest
import torch

from metaloop.meta import LearnerConfig, build_learner
from metaloop.meta.data import EpisodeBatch, tokenize
from metaloop.meta.encoder import Encoder, length_groups
from metaloop.meta.vocab import EpisodeVocab, word_embedding_name


def _meta_grads(model, batch, **cfg) -> tuple[list[torch.Tensor], float]:
    learner = build_learner(model, LearnerConfig(inner_steps=3, inner_lr=0.5, **cfg))
    learner.zero_grad(set_to_none=True)
    out = learner.outer_backward(batch, weight=0.5)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in learner.meta_parameters()]
    learner.zero_grad(set_to_none=True)
    return grads, out.loss


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


def test_episode_vocab_renumbers_onto_the_rows_it_slices(tiny, toy_batch):
    model, tok = tiny
    batch = toy_batch(tok)
    name = word_embedding_name(model)
    assert name == "embeddings.word_embeddings.weight"
    vocab = EpisodeVocab.of(name, batch.support, batch.query)
    weight = model.get_input_embeddings().weight
    assert 0 < len(vocab) < weight.shape[0]
    ids = batch.query["input_ids"]
    # looking up the renumbered ids in the slice gives the rows the original ids give
    torch.testing.assert_close(vocab.slice(weight)[vocab.remap(batch.query)["input_ids"]], weight[ids])
    full = vocab.unslice(weight.detach(), torch.zeros(len(vocab), weight.shape[1]))
    assert float(full[ids].abs().sum()) == 0.0
    untouched = torch.ones(weight.shape[0], dtype=torch.bool)
    untouched[vocab.ids] = False
    torch.testing.assert_close(full[untouched], weight.detach()[untouched])


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "metasgd", "reptile"])
def test_episode_vocab_gives_the_same_meta_gradient(tiny, toy_batch, algorithm):
    model, tok = tiny
    batch = toy_batch(tok)
    model = model.double()
    sliced, loss = _meta_grads(model, batch, algorithm=algorithm)
    dense, dense_loss = _meta_grads(model, batch, algorithm=algorithm, slice_vocab=False)
    assert loss == pytest.approx(dense_loss, rel=1e-9)
    _assert_same(sliced, dense)
    # the check has teeth: the embedding's meta-gradient is not zero
    emb = model.get_input_embeddings().weight
    learner = build_learner(model, LearnerConfig(algorithm=algorithm))
    index = next(i for i, p in enumerate(learner.meta_parameters()) if p is emb)
    assert float(sliced[index].abs().sum()) > 0


def test_inner_loop_adapts_only_the_episode_rows(tiny, toy_batch):
    model, tok = tiny
    batch = toy_batch(tok)
    learner = build_learner(model, LearnerConfig(algorithm="maml", inner_steps=2, inner_lr=0.5))
    vocab = learner.episode_vocab(batch)
    inner = learner._adapt(batch, vocab, create_graph=False, detach_meta=True)
    assert inner.encoder[vocab.name].shape == (len(vocab), model.config.hidden_size)
    public = learner.adapt(batch)  # full-size: applies to any input
    assert public.encoder[vocab.name].shape == model.get_input_embeddings().weight.shape
    # ProtoNet and head-only learners have nothing to slice
    assert build_learner(model, LearnerConfig(algorithm="anil")).episode_vocab(batch) is None


@pytest.mark.parametrize(("algorithm", "checkpointing"),
                         [("maml", False), ("maml", True), ("fomaml", False), ("metasgd", False)])
def test_chunked_query_loss_gives_the_same_meta_gradient(tiny, toy_batch, algorithm, checkpointing):
    model, tok = tiny
    batch = toy_batch(tok, ways=3, queries=3)
    assert len(batch.query_y) == 9
    model = model.double()
    whole, loss = _meta_grads(model, batch, algorithm=algorithm, checkpointing=checkpointing)
    chunked, chunked_loss = _meta_grads(model, batch, algorithm=algorithm, checkpointing=checkpointing,
                                        query_chunk=2)
    assert chunked_loss == pytest.approx(loss, rel=1e-9)
    _assert_same(chunked, whole)


def test_chunked_query_loss_with_top_k_reaches_the_frozen_prefix(tiny, toy_batch):
    # the lower layers are not fast weights: their meta-gradient comes straight from each
    # chunk's backward, plus the inner loop's path
    model, tok = tiny
    batch = toy_batch(tok, ways=3, queries=3)
    model = model.double()
    whole, _ = _meta_grads(model, batch, algorithm="maml", adapt="top_k", top_k=1)
    chunked, _ = _meta_grads(model, batch, algorithm="maml", adapt="top_k", top_k=1, query_chunk=4)
    _assert_same(chunked, whole)
    assert all(float(g.abs().sum()) > 0 for g in whole[:3])


def test_length_groups_cover_every_row_once_at_its_groups_width():
    lengths = torch.tensor([3, 12, 4, 30, 5, 11, 6, 13, 2])
    mask = (torch.arange(30) < lengths[:, None]).long()
    groups = length_groups(mask, 3)
    assert groups is not None and len(groups) == 3
    rows = torch.cat([r for r, _ in groups])
    assert sorted(rows.tolist()) == list(range(9))
    for r, width in groups:
        assert width == int(lengths[r].max())
    assert sum(len(r) * w for r, w in groups) < mask.numel()
    assert length_groups(mask, 1) is None
    assert length_groups(mask.flip(1), 3) is None  # left padding: cutting columns would move tokens
    same = torch.ones(9, 30, dtype=torch.long)
    assert length_groups(same, 3) is None  # nothing to save


def _varied_batch(tok) -> EpisodeBatch:
    words = "refund money back where parcel track cancel order stop size fit small please help".split()
    texts = [" ".join(words[: 1 + (i * 7) % len(words)]) for i in range(12)]
    y = torch.tensor([i % 3 for i in range(12)])
    sup, qry = tokenize(tok, texts[:6], 64), tokenize(tok, texts[6:], 64)
    return EpisodeBatch(sup, y[:6], qry, y[6:], 3)


def test_length_groups_give_the_same_embeddings_and_meta_gradient(tiny):
    model, tok = tiny
    batch = _varied_batch(tok)
    assert length_groups(batch.query["attention_mask"], 2) is not None
    model = model.double()
    one, grouped = Encoder(model), Encoder(model, length_groups=2)
    torch.testing.assert_close(grouped(batch.query), one(batch.query), rtol=1e-9, atol=1e-12)
    plain, loss = _meta_grads(model, batch, algorithm="maml")
    fewer, grouped_loss = _meta_grads(model, batch, algorithm="maml", length_groups=2)
    assert grouped_loss == pytest.approx(loss, rel=1e-9)
    _assert_same(fewer, plain)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_length_groups_reach_the_frozen_prefix(tiny, checkpointing):
    # top_k: the lower layers run once per episode, per length group, and still get meta-gradients
    from metaloop.meta.encoder import GroupedPrefix

    model, tok = tiny
    batch = _varied_batch(tok)
    model = model.double()
    assert isinstance(Encoder(model, length_groups=2).prefix(batch.support, 1), GroupedPrefix)
    cfg = {"algorithm": "maml", "adapt": "top_k", "top_k": 1, "checkpointing": checkpointing}
    plain, loss = _meta_grads(model, batch, **cfg)
    grouped, grouped_loss = _meta_grads(model, batch, length_groups=2, **cfg)
    assert grouped_loss == pytest.approx(loss, rel=1e-9)
    _assert_same(grouped, plain)
    assert all(float(g.abs().sum()) > 0 for g in plain[:3])
