"""The few-shot benchmark's core (bench/fewshot.py, bench/fewshot_eval/) on a tiny random BERT
and a synthetic multi-domain JSONL file (no CLINC150 needed).

Checks: the 95% CI (known t quantiles, a known data set); the frozen-centroid classifier is
exact on classes an embedding separates (and is not with scrambled support labels); it is the
ProtoNet classifier (same accuracy as `ProtoNet.evaluate`); fine-tuning leaves the source
model untouched and lowers its loss; the harness curates, builds hashed episodes, runs every
kind of method (baseline, supervised pretraining, a meta-learner via metaloop.train.run) on
the identical episodes and writes the issue's JSON schema and a PNG; a changed episode list
is refused.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import importlib.util
import json
import random
import string
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaloop.backbone import tiny_bert
from metaloop.episodes import Episode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # the benchmark's own package, bench/fewshot_eval

from fewshot_eval import (  # noqa: E402
    EmbeddingCache,
    FinetuneParams,
    FrozenCentroid,
    finetune_encoder,
    mean_ci95,
    t_quantile,
)
from metaloop.meta.head import Centroids
from metaloop.sources import packaged_domains

torch.set_num_threads(1)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_fewshot", ROOT / "bench" / "fewshot.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_fewshot"] = mod
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("df,expected", [(1, 12.7062), (4, 2.7764), (9, 2.2622), (14, 2.1448), (100, 1.9840)])
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-4)


def test_mean_ci95_known_values():
    s = mean_ci95([1.0, 2.0, 3.0, 4.0, 5.0])
    # sd = sqrt(2.5), t(0.975, 4) = 2.7764 -> 2.7764 * 1.5811 / sqrt(5)
    assert s.mean == 3.0 and s.n == 5
    assert s.ci95 == pytest.approx(2.7764 * 2.5 ** 0.5 / 5 ** 0.5, rel=1e-4)
    assert mean_ci95([7.0, 7.0, 7.0]).ci95 == 0.0
    assert mean_ci95([42.0]).ci95 == 0.0


# ---------------------------------------------------------------- frozen centroid


class BagOfTokens(nn.Module):
    """An 'encoder' whose embedding is the token histogram: it separates classes written with
    disjoint letters."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, inputs):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        hist = torch.zeros(ids.shape[0], self.vocab)
        hist.scatter_add_(1, ids, mask.float())
        return hist / mask.sum(1, keepdim=True)


def _separable_episode(shots: int, scramble: bool = False) -> tuple[Episode, dict[str, str]]:
    rng = random.Random(0)
    letters = {0: "abcde", 1: "fghij", 2: "klmno", 3: "pqrst"}
    texts, s_ids, s_y, q_ids, q_y = {}, [], [], [], []
    for y, pool in letters.items():
        for i in range(shots + 6):
            rid = f"{y}-{i}"
            texts[rid] = " ".join("".join(rng.choice(pool) for _ in range(rng.randint(3, 7))) for _ in range(3))
            (s_ids if i < shots else q_ids).append(rid)
            (s_y if i < shots else q_y).append(y)
    if scramble:
        s_y = s_y[shots:] + s_y[:shots]  # every support label moves to another class
    ep = Episode("toy-0", "toy", ("a", "b", "c", "d"), tuple(s_ids), tuple(s_y), tuple(q_ids), tuple(q_y))
    return ep, texts


def test_frozen_centroid_is_exact_on_separable_classes(tiny):
    _, tok = tiny
    enc = BagOfTokens(len(tok.get_vocab()))
    for shots in (1, 3):
        ep, texts = _separable_episode(shots)
        method = FrozenCentroid(EmbeddingCache(enc, tok, 32))
        assert method.accuracy(ep, lambda ids, texts=texts: [texts[i] for i in ids]) == 1.0
    bad, texts = _separable_episode(3, scramble=True)
    assert FrozenCentroid(EmbeddingCache(enc, tok, 32)).accuracy(bad, lambda ids: [texts[i] for i in ids]) == 0.0


@pytest.mark.parametrize("centroids", [Centroids(), Centroids("cosine", 20.0, 1.0), Centroids("sqeuclidean", 10, 2.0)],
                         ids=["sqeuclidean", "cosine+names", "sqeuclidean+names"])
def test_frozen_centroid_equals_protonet_and_caches(tiny, toy_episode_and_texts, centroids):
    from metaloop.meta.algorithms import LearnerConfig, build_learner
    from metaloop.meta.data import episode_batch

    model, tok = tiny
    ep, texts_of = toy_episode_and_texts
    learner = build_learner(model, LearnerConfig(algorithm="protonet", pooling="mean", centroids=centroids)).eval()
    cache = EmbeddingCache(learner.encoder, tok, 32)
    ours = FrozenCentroid(cache, centroids).accuracy(ep, texts_of)
    theirs = learner.evaluate(episode_batch(ep, texts_of, tok, 32, label_names=centroids.uses_labels)).acc
    assert ours == pytest.approx(theirs, abs=1e-6)
    names = ep.ways if centroids.uses_labels else 0  # class names are cached by their text
    assert len(cache) == len(set(ep.support_ids) | set(ep.query_ids)) + names


def test_head_fit_starts_from_the_centroids_and_fits_the_support(tiny, toy_episode_and_texts):
    from fewshot_eval import CentroidHeadFit

    model, tok = tiny
    ep, texts_of = toy_episode_and_texts
    from metaloop.meta.encoder import Encoder

    cache = EmbeddingCache(Encoder(model, "mean"), tok, 32)
    for c in (Centroids(), Centroids("cosine", 10.0, 1.0)):
        assert CentroidHeadFit(cache, c, steps=0).accuracy(ep, texts_of) == FrozenCentroid(cache, c).accuracy(ep, texts_of)
    # overlapping classes: class means misclassify support rows, fitted prototypes do not
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(6)
    z = torch.randn(4, 16, generator=gen)[y] * 0.3 + torch.randn(24, 16, generator=gen)
    c = Centroids("cosine", 10.0)
    before = (c.logits(z, c.prototypes(z, y, 4)).argmax(-1) == y).float().mean()
    fitted = CentroidHeadFit(cache, c, steps=300, lr=1e-2).weights(z, y, 4, None)
    after = (c.logits(z, fitted).argmax(-1) == y).float().mean()
    assert before < 1.0 and after > before


@pytest.fixture
def toy_episode_and_texts():
    """A 4-way 2-shot eval episode (the library's eval recipe) over keyword texts."""
    import pandas as pd

    from metaloop.episode_sets import eval_recipe
    from metaloop.episodes import Pool

    rng = random.Random(0)
    keys = {"refund": "refund money back", "track": "where parcel track", "cancel": "cancel order stop",
            "size": "size fit small"}
    rows = [{"id": f"{lab}-{i}", "text": " ".join(rng.sample(k.split(), 2) + ["please", str(i)]), "label": lab,
             "domain": "shop", "split": "test" if i % 3 == 0 else "train"}
            for lab, k in keys.items() for i in range(6)]
    pool = Pool(pd.DataFrame(rows))
    return eval_recipe("shop", 2).sample(pool, 13, 0), pool.texts


def test_finetune_trains_a_copy(tiny, toy_episode_and_texts):
    model, tok = tiny
    ep, texts_of = toy_episode_and_texts
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = FinetuneParams(epochs=15, lr=3e-3, head_lr=3e-2, batch_size=8, dropout=False)
    enc, _, losses = finetune_encoder(model, tok, texts_of(ep.support_ids), ep.support_y, ep.ways, params,
                                         max_length=32)
    assert len(losses) == params.steps_for(len(ep.support_ids))
    assert losses[-1] < losses[0]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in the source model"
    assert any(not torch.equal(p, before[n]) for n, p in enc.model.state_dict().items())


def test_finetune_can_keep_the_word_embeddings_fixed(tiny, toy_episode_and_texts):
    from metaloop.meta.vocab import word_embedding_name

    model, tok = tiny
    ep, texts_of = toy_episode_and_texts
    name = word_embedding_name(model)
    for freeze in (False, True):
        params = FinetuneParams(epochs=5, lr=3e-3, head_lr=3e-2, batch_size=8, dropout=False,
                                freeze_word_embeddings=freeze)
        enc, _, _ = finetune_encoder(model, tok, texts_of(ep.support_ids), ep.support_y, ep.ways, params,
                                     max_length=32)
        after = enc.model.state_dict()
        assert torch.equal(after[name], model.state_dict()[name]) == freeze
        layers = [k for k in after if ".layer." in k and k.endswith("weight")]
        assert any(not torch.equal(after[k], model.state_dict()[k]) for k in layers)  # the rest trains


@pytest.mark.parametrize("centroids", [Centroids("sqeuclidean"), Centroids("cosine", 20.0, 1.0)],
                         ids=["sqeuclidean", "cosine+names"])
def test_leave_one_out_logits_match_prototypes_made_without_the_row(centroids):
    from fewshot_eval.finetune import leave_one_out_logits

    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    z, names = torch.randn(7, 5, generator=g), torch.randn(3, 5, generator=g)
    label_z = names if centroids.uses_labels else None
    got = leave_one_out_logits(centroids, z, y, 3, label_z)
    for i in range(len(y)):
        rest = torch.arange(len(y)) != i
        own = centroids.prototypes(z[rest], y[rest], 3, label_z)[y[i]]
        others = centroids.prototypes(z, y, 3, label_z)
        protos = others.clone()
        protos[y[i]] = own
        torch.testing.assert_close(got[i], centroids.logits(z[i : i + 1], protos)[0])
    with pytest.raises(ValueError, match="2 shots a class or the class names"):
        leave_one_out_logits(Centroids("cosine"), z[[0, 2, 5]], torch.tensor([0, 1, 2]), 3)


def test_episodic_finetune_trains_the_encoder_and_scores_by_prototypes(tiny, toy_episode_and_texts):
    from metaloop.centroid_classifier import CentroidLayer

    model, tok = tiny
    ep, texts_of = toy_episode_and_texts
    cos = Centroids("cosine", 10.0, label_shots=1.0)
    params = FinetuneParams(epochs=8, lr=3e-3, dropout=False, classifier="episodic")
    enc, head, losses = finetune_encoder(model, tok, texts_of(ep.support_ids), ep.support_y, ep.ways, params,
                                         max_length=32, labels=list(ep.labels), centroids=cos)
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert isinstance(head, CentroidLayer)
    assert any(not torch.equal(p, model.state_dict()[n]) for n, p in enc.model.state_dict().items())


def test_finetune_interpolates_between_start_and_fine_tuned_weights(tiny, toy_episode_and_texts):
    model, tok = tiny
    ep, texts_of = toy_episode_and_texts
    cos = Centroids("cosine", 10.0, label_shots=1.0)
    common = {"epochs": 5, "lr": 3e-3, "head_lr": 3e-2, "batch_size": 8, "dropout": False, "classifier": "centroids"}
    runs = {a: finetune_encoder(model, tok, texts_of(ep.support_ids), ep.support_y, ep.ways,
                                FinetuneParams(**common, interpolate=a), max_length=32, labels=list(ep.labels),
                                centroids=cos) for a in (1.0, 0.5)}
    start, tuned, half = model.state_dict(), runs[1.0][0].model.state_dict(), runs[0.5][0].model.state_dict()
    moved = [k for k in tuned if k in start and start[k].is_floating_point() and not torch.equal(start[k], tuned[k])]
    assert moved
    for k in moved:  # the same seeded run, then halfway back to the start
        torch.testing.assert_close(half[k], 0.5 * (start[k] + tuned[k]), atol=1e-6, rtol=1e-5)
    head_start = runs[1.0][1].weight.detach()
    assert not torch.allclose(runs[0.5][1].weight, head_start)


def test_finetune_with_the_centroid_classifier_starts_at_the_prototypes(tiny, toy_episode_and_texts):
    from metaloop.centroid_classifier import CentroidLayer
    from metaloop.meta.encoder import Encoder
    from metaloop.meta.head import label_text

    model, tok = tiny
    ep, texts_of = toy_episode_and_texts
    texts, labels = texts_of(ep.support_ids), list(ep.labels)
    cos = Centroids("cosine", 10.0, label_shots=1.0)
    common = {"epochs": 15, "lr": 3e-3, "head_lr": 3e-2, "batch_size": 8, "dropout": False, "classifier": "centroids"}
    # zero steps: the head is exactly the centroid classifier, class names included
    frozen = FinetuneParams(**{**common, "epochs": 1, "min_steps": 0, "lr": 1e-12, "head_lr": 1e-12})
    enc, head, _ = finetune_encoder(model, tok, texts, ep.support_y, ep.ways, frozen, max_length=32,
                                    labels=labels, centroids=cos)
    assert isinstance(head, CentroidLayer)
    base = Encoder(model).eval()
    with torch.no_grad():
        from metaloop.meta.data import tokenize

        zs, zl = base(tokenize(tok, texts, 32)), base(tokenize(tok, [label_text(n) for n in labels], 32))
        expected = cos.prototypes(zs, torch.tensor(ep.support_y), ep.ways, zl)
    torch.testing.assert_close(F.normalize(head.weight.detach(), dim=-1), F.normalize(expected, dim=-1),
                               atol=1e-4, rtol=1e-4)
    enc, head, losses = finetune_encoder(model, tok, texts, ep.support_y, ep.ways, FinetuneParams(**common),
                                         max_length=32, labels=labels, centroids=cos)
    assert losses[-1] < losses[0]
    assert len(losses) == FinetuneParams(**common).steps_for(len(texts) + ep.ways)  # names are rows too
    with pytest.raises(ValueError, match="needs the `centroids` classifier"):
        finetune_encoder(model, tok, texts, ep.support_y, ep.ways, FinetuneParams(**common), max_length=32)


def test_prototype_head_is_the_centroid_classifier_scaled():
    from fewshot_eval.finetune import _head_from_prototypes

    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(12, 8, generator=g), torch.arange(4).repeat(3)
    q = torch.randn(20, 8, generator=g)
    ref = Centroids().logits(q, Centroids().prototypes(z, y, 4))  # -||q - c||^2
    for scale in (1.0, 0.1):
        head = _head_from_prototypes(z, y, 4, True, scale)
        with torch.no_grad():
            # W q + b = scale * (-||q - c||^2 + ||q||^2): same ranking, logits scaled
            expected = scale * (ref + (q * q).sum(-1, keepdim=True))
            torch.testing.assert_close(head(q), expected, atol=1e-4, rtol=1e-4)
            assert torch.equal(head(q).argmax(-1), ref.argmax(-1))


# ---------------------------------------------------------------- the harness end to end


def _synthetic_jsonl(path: Path) -> None:
    """6 domains x 4 labels, keyword-separable; 12 train, 4 val, 4 test rows per label."""
    rng = random.Random(1)
    words = [w for w in ("".join(rng.choice(string.ascii_lowercase) for _ in range(5)) for _ in range(200))]
    filler = ["please", "i", "need", "the", "my", "now", "help", "can", "you"]
    rows = []
    for d in range(6):
        for lab in range(4):
            keys = words[(d * 4 + lab) * 3 : (d * 4 + lab) * 3 + 3]
            for i in range(20):
                split = "train" if i < 12 else "val" if i < 16 else "test"
                text = " ".join(rng.sample(keys, 2) + rng.sample(filler, 2))
                rows.append({"text": f"{text} {i}", "label": f"l{lab}", "domain": f"dom{d}", "split": split})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_harness_runs_every_kind_of_method_on_identical_episodes(tmp_path, tiny_dir):
    bench = _bench()
    data = tmp_path / "synthetic.jsonl"
    _synthetic_jsonl(data)
    cfg, _ = bench.parse_args([
        "--data", str(data), "--work-dir", str(tmp_path / "work"), "--params", str(tmp_path / "none.yaml"),
        "--backbone", str(tiny_dir), "--max-length", "32", "--threads", "1",
        "--targets", "dom4,dom5", "--meta-train", "dom0,dom1,dom2", "--meta-val", "dom3",
        "--shots", "1,2", "--draws", "2",
        "--methods", "frozen-centroid,finetune,supervised-pretrain,protonet",
        "--meta-steps", "2", "--meta-batch", "2", "--meta-ways", "3", "--meta-shots", "2", "--meta-queries", "2",
        "--val-every", "1", "--val-episodes", "2", "--meta-set", "checkpoint_every=1",
        "--meta-set", "metric=cosine", "--meta-set", "label_shots=1", "--head-steps", "5",
        "--ft-epochs", "2", "--pretrain-steps", "3", "--meta-minutes", "5",
    ])
    cfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"val_every": 2})})
    # the baselines' centroid classifier defaults to the meta-learners' (class names included)
    assert bench.baseline_centroids(cfg, bench.bench_params(cfg)).label_shots == 1
    report = bench.run_benchmark(cfg)
    out = bench.to_json(report)

    # the schema
    assert list(out)[:3] == ["target_domains", "eval_hash", "results"]
    assert out["target_domains"] == ["dom4", "dom5"]
    methods = ["frozen-centroid", "frozen-centroid+head", "finetune", "supervised-pretrain-centroid",
               "supervised-pretrain-centroid+head", "supervised-pretrain", "protonet", "protonet+head"]
    assert [(r["method"], r["shots"]) for r in out["results"]] == [(m, k) for m in methods for k in (1, 2)]
    for r in out["results"]:
        assert set(r) == {"method", "shots", "accuracy", "ci95", "seconds"}
        assert 0.0 <= r["accuracy"] <= 100.0 and r["ci95"] >= 0.0 and r["seconds"] >= 0.0
    # identical, hashed episodes: 2 domains x 2 shot counts x 2 draws, all test rows as queries
    assert {r.eval_hash for r in report.runs} == {out["eval_hash"]}
    assert len(report.evalset.episodes) == 8 and out["episodes_per_shot"] == {"1": 4, "2": 4}
    assert out["queries_by_domain"] == {"dom4": 16, "dom5": 16}
    assert all(len(r.scores) == 8 for r in report.runs)
    # +head leaves 1-shot episodes to the centroids (min_shots 2)
    by = {r.name: r for r in report.runs}
    assert [s.accuracy for s in by["protonet"].scores if s.shots == 1] == \
        [s.accuracy for s in by["protonet+head"].scores if s.shots == 1]
    # target and meta-val domains never reach meta-training
    from metaloop.episodes import read_manifest

    seen = {e.domain for e in read_manifest(tmp_path / "work" / "episodes" / "meta_train.jsonl")}
    assert seen <= {"dom0", "dom1", "dom2"}
    assert {e.domain for e in read_manifest(tmp_path / "work" / "episodes" / "meta_val.jsonl")} == {"dom3"}
    assert {r.name: r for r in report.runs}["protonet"].info["steps"] == 2
    # a second build of the episodes gives the same hash
    params = bench.bench_params(cfg)
    pool, _ = bench.curate_pool(params)
    assert bench.build_eval_set(pool, params).hash == out["eval_hash"]
    # --dev: the meta-val domain, its val split as queries (never a target, never test)
    dev = bench.build_eval_set(pool, params, dev=True)
    assert dev.domains == ["dom3"] and dev.split == "val" and dev.hash != out["eval_hash"]
    assert all(pool.label[q] and q in set(pool.rows("dom3", "val", pool.label[q])) for q in dev.episodes[0].query_ids)
    assert len(dev.episodes[0].query_ids) == 16

    table = bench.format_table(report)
    assert "frozen-centroid" in table and "protonet" in table and out["eval_hash"][:16] in table
    png = tmp_path / "plot.png"
    bench.plot(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # bench/finetune_variants.py on the ProtoNet encoder just trained: its soup column is
    # what adapt.soup ships (the same weights, so the same queries right)
    spec = importlib.util.spec_from_file_location("bench_variants", ROOT / "bench" / "finetune_variants.py")
    variants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(variants)
    flags = ["--data", str(data), "--work-dir", str(tmp_path / "work"), "--params", str(tmp_path / "none.yaml"),
             "--backbone", str(tiny_dir), "--max-length", "32", "--threads", "1", "--meta-val", "dom3",
             "--targets", "dom4,dom5", "--meta-train", "dom0,dom1,dom2", "--meta-ways", "3",
             "--shots", "1,2", "--draws", "2", "--meta-set", "metric=cosine", "--meta-set", "label_shots=1",
             "--ft-epochs", "2", "--ft-impl", "adapt-fit", "--ft-classifier", "centroids"]
    assert variants.main(["--seeds", "13,14", "--json", str(tmp_path / "variants.json"), "--logits",
                          str(tmp_path / "a13.npz"), "--", *flags]) == 0
    rows = json.loads((tmp_path / "variants.json").read_text())["rows"]
    assert [r["episode"] for r in rows] == [e.id for e in dev.episodes]
    with np.load(tmp_path / "a13.npz") as logits:  # --logits: column A13's own logits
        assert [float((logits[e.id].argmax(1) == np.array(e.query_y)).mean()) for e in dev.episodes] == \
            pytest.approx([r["A13"] for r in rows], abs=1e-6)
    assert {"A13", "B13", "AB13", "A14", "ensA2", "soup2"} <= set(rows[0])
    vcfg, _ = bench.parse_args([*flags, "--dev", "--ft-soup", "2"])
    shipped = bench._finetune_method(vcfg, params, None, None, tmp_path / "work" / "meta" / "protonet" / "model")
    assert shipped.accuracy(dev.episodes[0], pool.texts) == pytest.approx(rows[0]["soup2"], abs=1e-6)
    # --second-init: its X column is the production fine-tuning from that folder (a tiny BERT of
    # another seed, so the two inits score apart); `pretrained` names the backbone itself
    other = tmp_path / "other-init"
    tiny_bert(other, seed=7)
    bcfg, _ = bench.parse_args([*flags, "--dev"])
    from_other = bench._finetune_method(bcfg, bench.bench_params(bcfg), None, None, other)
    expected = [from_other.accuracy(e, pool.texts) for e in dev.episodes]
    assert expected != [r["A13"] for r in rows]
    assert variants.main(["--seeds", "13", "--second-init", str(other), "--json", str(tmp_path / "x.json"), "--",
                          *flags]) == 0
    xrows = json.loads((tmp_path / "x.json").read_text())["rows"]
    assert {"X", "ensAX", "soupAX"} <= set(xrows[0]) and [r["A13"] for r in xrows] == [r["A13"] for r in rows]
    assert [r["X"] for r in xrows] == pytest.approx(expected, abs=1e-6)

    # a method handed other episodes is refused
    changed = replace(report.evalset, episodes=report.evalset.episodes[:-1])
    with pytest.raises(AssertionError, match="changed"):
        bench.score("x", None, changed, pool, 0.0)


def test_missing_data_exits_with_a_message(tmp_path, capsys):
    bench = _bench()
    assert bench.main(["--data", str(tmp_path / "absent.jsonl")]) == 2
    assert "CLINC150 not found" in capsys.readouterr().err


def test_ft_soup_reaches_adapt_fit_and_is_refused_elsewhere(tmp_path):
    bench = _bench()
    cfg, _ = bench.parse_args(["--ft-impl", "adapt-fit", "--ft-classifier", "centroids", "--ft-soup", "3"])
    params = bench.bench_params(cfg)
    method = bench._finetune_method(cfg, params, None, None, tmp_path)
    assert method.params.soup == 3 and method.params.classifier == "centroids"
    with pytest.raises(SystemExit, match="--ft-soup"):
        bench.parse_args(["--ft-soup", "3"])  # the pooled implementation has no soup


def test_packaged_corpus_joins_meta_training_only(tmp_path):
    """--meta-train-packaged adds the packaged corpus as a source and its domains to
    meta-train; targets and meta-val stay CLINC's."""
    bench = _bench()
    data = tmp_path / "synthetic.jsonl"
    _synthetic_jsonl(data)
    cfg, _ = bench.parse_args(["--data", str(data), "--work-dir", str(tmp_path / "w"), "--meta-train-packaged"])
    params = bench.bench_params(cfg)
    packaged = packaged_domains()  # none of them is a CLINC150 domain
    assert "hospitality" in packaged and len(packaged) == 12
    assert params.domains.meta_train == [*cfg.meta_train, *packaged]
    assert params.domains.target == cfg.targets and not set(packaged) & set(cfg.targets + cfg.meta_val)
    assert [s.kind for s in params.sources] == ["file", "packaged"]
    plain = bench.bench_params(bench.parse_args(["--data", str(data), "--work-dir", str(tmp_path / "w")])[0])
    assert [s.kind for s in plain.sources] == ["file"] and not set(packaged) & set(plain.domains.meta_train)


def test_meta_minutes_stops_training_and_still_exports(tmp_path, tiny_dir):
    bench = _bench()
    data = tmp_path / "synthetic.jsonl"
    _synthetic_jsonl(data)
    cfg, _ = bench.parse_args([
        "--data", str(data), "--work-dir", str(tmp_path / "work"), "--params", str(tmp_path / "none.yaml"),
        "--backbone", str(tiny_dir), "--max-length", "32", "--threads", "1",
        "--targets", "dom5", "--meta-train", "dom0,dom1,dom2,dom3", "--meta-val", "dom4",
        "--shots", "1", "--draws", "1", "--methods", "protonet",
        "--meta-steps", "100000", "--meta-minutes", "0.005", "--meta-batch", "1", "--meta-ways", "2",
        "--meta-shots", "1", "--meta-queries", "1", "--val-every", "5", "--val-episodes", "1",
    ])
    report = bench.run_benchmark(cfg)
    info = report.runs[0].info
    assert info["time_limited"] and 0 < info["steps"] < 100000
    assert (Path(info["model_dir"]) / "config.json").is_file()  # the best step was exported
    assert len(report.runs[0].scores) == 1


def test_plot_merge_labels_files_and_refuses_different_episodes(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_fewshot", ROOT / "bench" / "plot_fewshot.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)

    def write(name, h, methods):
        path = tmp_path / name
        rows = [{"method": m, "shots": 1, "accuracy": 50.0, "ci95": 1.0, "seconds": 1.0} for m in methods]
        path.write_text(json.dumps({"target_domains": ["a"], "eval_hash": h, "results": rows}))
        return str(path)

    new, old = write("new.json", "h1", ["frozen-centroid", "protonet"]), write("old.json", "h1", ["protonet", "x"])
    _, _, rows = plot.merge([new, old])
    assert [r["method"] for r in rows] == ["frozen-centroid", "protonet", "x"]  # a repeated method is skipped
    _, _, rows = plot.merge([new, f"{old}@(v1)"])
    assert [r["method"] for r in rows] == ["frozen-centroid", "protonet", "protonet (v1)", "x (v1)"]
    with pytest.raises(SystemExit, match="different episodes"):
        plot.merge([new, write("other.json", "h2", ["y"])])


def test_cross_encoder_probe_trains_scores_by_class_means_and_fuses(tmp_path, tiny_dir):
    """bench/cross_encoder.py: training lowers its loss; a class scores the mean of its supports' and
    name's pair scores; the fusion mixes the two softmaxes and is paired against the fine-tuning."""
    spec = importlib.util.spec_from_file_location("bench_cross", ROOT / "bench" / "cross_encoder.py")
    cross = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cross)
    data = tmp_path / "synthetic.jsonl"
    _synthetic_jsonl(data)
    flags = ["--data", str(data), "--work-dir", str(tmp_path / "work"), "--params", str(tmp_path / "none.yaml"),
             "--backbone", str(tiny_dir), "--max-length", "32", "--threads", "1", "--meta-val", "dom3",
             "--targets", "dom4,dom5", "--meta-train", "dom0,dom1,dom2", "--meta-ways", "3", "--shots", "1,2",
             "--draws", "2"]
    out = tmp_path / "cross"
    assert cross.main(["train", "--out", str(out), "--init", str(tiny_dir), "--steps", "200", "--lr", "1e-3",
                       "--name-p", "0.5", "--", *flags]) == 0
    losses = json.loads((out / "cross.json").read_text())["losses"]
    assert len(losses) == 200 and sum(losses[-20:]) < 0.5 * sum(losses[:20])

    cfg, _ = _bench().parse_args([*flags, "--dev"])
    params = _bench().bench_params(cfg)
    pool, _ = _bench().curate_pool(params)
    ev = _bench().build_eval_set(pool, params, dev=True)
    scores = cross.score(params, pool, ev, out)
    ep = ev.episodes[-1]  # 2 shots: a class's score is the mean of 3 pair scores
    assert scores[ep.id].shape == (len(ep.query_ids), ep.ways)
    matcher = cross.CrossMatcher(tiny_dir)
    matcher.load_state_dict(cross.load_file(out / cross.WEIGHTS))
    tok = cross.AutoTokenizer.from_pretrained(out)
    query, c = pool.texts(ep.query_ids[:1])[0], 1
    rows = [t for t, y in zip(pool.texts(ep.support_ids), ep.support_y) if y == c]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        pair = matcher.eval()(cross._pairs(tok, [(query, s) for s in [*rows, cross.label_text(ep.labels[c])]], 32))
    assert len(rows) == 2 and scores[ep.id][0, c] == pytest.approx(float(pair.float().mean()), abs=1e-4)

    rng = np.random.default_rng(0)
    finetune = {e.id: 3 * rng.normal(size=scores[e.id].shape) for e in ev.episodes}
    one = [e for e in ev.episodes if len(e.support_ids) // e.ways == 1]

    def acc(z, e):
        return 100 * float((z.argmax(1) == np.array(e.query_y)).mean())

    base = [acc(finetune[e.id], e) for e in one]
    fused = [acc(0.65 * cross._softmax(finetune[e.id]) + 0.35 * cross._softmax(scores[e.id]), e) for e in one]
    row = cross.report(ev, scores, finetune)[0]
    assert row["shots"] == 1 and row["cross"] == pytest.approx(np.mean([acc(scores[e.id], e) for e in one]))
    assert row["finetune"] == pytest.approx(np.mean(base))
    assert row["fused0.35"][:2] == pytest.approx((np.mean(fused), np.mean(fused) - np.mean(base)))
    alone = cross.report(ev, finetune, finetune)  # fused with itself: no change
    assert all(r[f"fused{a}"][1:] == (0.0, 0.0) for r in alone for a in cross.FUSE)
