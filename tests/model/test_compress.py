"""Compression recipes on a tiny BERT adapted to a toy keyword domain.

Every recipe's output is loaded from disk alone (its teacher deleted first) and must give
the teacher's label on the training texts for at least the share stated in AGREEMENT;
vocabulary trimming alone must agree exactly. Pruned heads and neurons must be physically
gone (fewer parameters, smaller matrices, also after reloading); the trimmed tokenizer must
reproduce the original tokens of every known word and spell unseen words with kept
pieces instead of [UNK].
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer, BertConfig

from metaloop.adapt import AdaptParams, adapt_domain, domain_data, predict_logits
from metaloop.compress import CompressParams, compress, load_classifier
from metaloop.compress.runtime import load_torch, n_heads
from metaloop.compress.vocab import trim_vocab
from metaloop.errors import ConfigError

torch.set_num_threads(1)

# share of training texts on which the compressed model must give the teacher's label
AGREEMENT = {"int8": 0.95, "int8_torch": 0.95, "trim_vocab": 1.0, "distill": 0.85, "prune": 0.85, "small": 0.8}

LABELS = {"refund": "refund money back", "track": "where parcel track", "cancel": "cancel order stop",
          "size": "size fit small"}
FILLER = ["please", "i", "you", "the", "a", "my", "can", "help", "need", "today", "now", "hi", "thanks"]
UNUSED = ["zebra", "quantum", "violin", "harbour"]  # whole-word tokens the domain never uses


def toy_table(per_label: int = 24, seed: int = 0) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for label, keys in LABELS.items():
        for i in range(per_label):
            text = " ".join(rng.sample(keys.split(), 2) + rng.sample(FILLER, 2))
            rows.append({"id": f"{label}-{i}", "text": text, "label": label, "domain": "shop",
                         "split": "test" if i % 4 == 0 else "train", "source": "toy"})
    return pd.DataFrame(rows)


def wordy_encoder(folder: Path) -> Path:
    """A tiny random BERT whose WordPiece vocabulary has whole words as well as characters."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,?!'"
    words = sorted({w for keys in LABELS.values() for w in keys.split()} | set(FILLER) | set(UNUSED)
                   | {"##ing", "##ed", "vio", "##lin"})
    vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars),
                                *words]))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)  # reads vocab.txt (BERT, lower case)
    assert len(tok.get_vocab()) == len(vocab)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(teacher folder, domain data): the tiny encoder adapted (full) to the toy domain."""
    root = tmp_path_factory.mktemp("compress")
    init = wordy_encoder(root / "init")
    table = toy_table()
    params = AdaptParams(epochs=30, lr=3e-3, head_lr=3e-2, batch_size=16, early_stopping_min_rows=1000)
    adapt_domain(init, table, "shop", params, root / "teacher", max_length=32)
    return root / "teacher", domain_data(table, "shop", params)


PARAMS = CompressParams(
    recipes={"int8": ["int8"], "distill": ["distill"], "prune": ["prune"], "trim_vocab": ["trim_vocab"],
             "small": ["distill", "prune", "trim_vocab", "int8"]},
    distill={"layers": 1, "epochs": 15, "lr": 3e-3, "alpha": 0.7},
    prune={"heads_keep": 0.5, "ffn_keep": 0.5, "epochs": 8, "lr": 1e-3, "alpha": 0.7},
)


def _copy(teacher_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "teacher"
    shutil.copytree(teacher_dir, dst)
    return dst


def _teacher_ids(teacher_dir: Path, texts) -> np.ndarray:
    model, tok, _ = load_torch(teacher_dir)
    return predict_logits(model, tok, texts, 32).argmax(-1).numpy()


@pytest.mark.parametrize("recipe", ["int8", "int8_torch", "trim_vocab", "distill", "prune", "small"])
def test_recipe_loads_from_disk_alone_and_agrees_with_teacher(tmp_path, teacher, recipe, caplog):
    teacher_dir, data = teacher
    src = _copy(teacher_dir, tmp_path)
    expected = _teacher_ids(src, data.train.texts)
    params = PARAMS
    if recipe == "int8_torch":
        params = PARAMS.model_copy(update={"int8": PARAMS.int8.model_copy(update={"backend": "torch"})})
    result = compress(src, tmp_path / "out", "int8" if recipe == "int8_torch" else recipe, params,
                      train=data.train, max_length=32)
    shutil.rmtree(src)  # the teacher is gone: the folder must stand alone
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "out", moved)

    clf = load_classifier(moved)
    agree = float(np.mean(clf.predict_ids(data.train.texts) == expected))
    assert agree >= AGREEMENT[recipe], f"{recipe}: agreement {agree:.3f}"
    assert result.agreement_train == pytest.approx(agree)
    assert clf.labels == ["cancel", "refund", "size", "track"]
    files = {p.name for p in moved.iterdir()}
    assert not files & {"pytorch_model.bin", "optimizer.pt"} and not list(moved.glob("*.pt"))
    fmt = json.loads((moved / "metaloop.json").read_text())["format"]
    assert fmt == {"int8": "onnx", "int8_torch": "torch-int8", "small": "onnx", "prune": "hf-pruned"}.get(recipe, "hf")
    if recipe in ("distill", "small"):
        assert result.params_after < result.params_before
    # onnxruntime's advice to pre-process is already followed (fusion): it is not logged every night
    assert not [r for r in caplog.records if "pre-processing before quantization" in r.getMessage()]


def test_pruned_heads_and_neurons_are_physically_gone(tmp_path, teacher):
    teacher_dir, data = teacher
    teacher_model = load_torch(teacher_dir)[0]
    params = PARAMS.model_copy(update={"prune": PARAMS.prune.model_copy(update={"epochs": 1})})
    result = compress(teacher_dir, tmp_path / "pruned", "prune", params, train=data.train, max_length=32)

    structure = result.details["prune"]["structure"]
    assert sum(structure["heads"]) == 4 and all(h >= 1 for h in structure["heads"])  # 8 heads -> 4
    assert sum(structure["intermediate"]) == 64  # 128 neurons -> 64
    model, _, meta = load_torch(tmp_path / "pruned")
    assert meta["structure"] == structure
    for layer, h, i in zip(model.bert.encoder.layer, structure["heads"], structure["intermediate"]):
        assert n_heads(layer) == h
        assert layer.attention.self.query.weight.shape == (h * 8, 32)
        assert layer.attention.output.dense.weight.shape == (32, h * 8)
        assert layer.intermediate.dense.weight.shape == (i, 32)
        assert layer.output.dense.weight.shape == (32, i)
    removed = 4 * (3 * (8 * 32 + 8) + 32 * 8)  # 4 heads of size 8: q,k,v rows (+bias), output columns
    removed_ffn = 64 * (32 + 1 + 32)  # 64 neurons: intermediate row (+bias), output column
    before = sum(p.numel() for p in teacher_model.parameters())
    after = sum(p.numel() for p in model.parameters())
    assert before - after == removed + removed_ffn
    with safe_open(str(tmp_path / "pruned" / "model.safetensors"), "pt") as f:
        stored = {k: int(np.prod(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118
    params = dict(model.named_parameters())
    assert sum(n for k, n in stored.items() if k in params) == after  # nothing of the dropped units is stored


def test_trimmed_vocab_round_trips_known_words_and_falls_back_for_unseen(teacher):
    teacher_dir, data = teacher
    model, tok, _ = load_torch(teacher_dir)
    full = load_torch(teacher_dir)[0]
    texts = data.train.texts
    trimmed, new_tok, info = trim_vocab(model, tok, texts, keep_chars="ascii", max_positions=48)
    assert info["vocab_after"] < info["vocab_before"]
    assert new_tok.convert_ids_to_tokens(0) == "[PAD]" and trimmed.config.pad_token_id == 0
    assert trimmed.get_input_embeddings().num_embeddings == len(new_tok.get_vocab()) == info["vocab_after"]
    for word in UNUSED:
        assert word not in new_tok.get_vocab()

    for text in texts:  # known words: the very same pieces, the same text back
        assert new_tok.tokenize(text) == tok.tokenize(text)
        assert new_tok.decode(new_tok(text)["input_ids"], skip_special_tokens=True) == text
    for word in UNUSED:  # unseen words: spelled with kept pieces, never [UNK]
        pieces = new_tok.tokenize(word)
        assert "[UNK]" not in pieces and len(pieces) > 1
        assert "".join(p.removeprefix("##") for p in pieces) == word
    assert new_tok.tokenize("violin") != tok.tokenize("violin")  # it was one token before trimming

    enc_old = tok(texts, padding=True, return_tensors="pt")
    enc_new = new_tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        a = full.eval()(**enc_old).logits
        b = trimmed.eval()(**enc_new).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert trimmed.config.max_position_embeddings == 48

    # keep_frequent also keeps the vocabulary's first ordinary tokens, here all of its words
    _, wide_tok, wide = trim_vocab(load_torch(teacher_dir)[0], tok, texts, keep_frequent=1000)
    assert all(word in wide_tok.get_vocab() for word in UNUSED) and wide["frequent_tokens"] > 0
    assert wide_tok.tokenize("violin") == ["violin"]


def test_torch_int8_folder_holds_int8_safetensors_only(tmp_path, teacher):
    teacher_dir, data = teacher
    params = PARAMS.model_copy(update={"int8": PARAMS.int8.model_copy(update={"backend": "torch"})})
    compress(teacher_dir, tmp_path / "q", "int8", params, train=data.train, max_length=32)
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    assert dtypes["bert.encoder.layer.0.attention.self.query.weight.int8"] == torch.int8
    assert not [p for p in (tmp_path / "q").iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    clf = load_classifier(tmp_path / "q")
    assert type(clf.model.bert.encoder.layer[0].attention.self.query).__module__.startswith("torch.ao.nn.quantized")


def test_recipes_are_validated():
    with pytest.raises(ValidationError, match="last step"):
        CompressParams(recipes={"bad": ["int8", "distill"]})
    with pytest.raises(ValidationError, match="reserved"):
        CompressParams(recipes={"fp32": ["int8"]})
    with pytest.raises(ValidationError):
        CompressParams(recipes={"x": ["quantum"]})
    with pytest.raises(ValidationError):
        CompressParams(colour="blue")
    with pytest.raises(ConfigError, match="unknown recipe"):
        CompressParams().steps("nope")
    assert CompressParams().steps(["distill", "int8"]) == ["distill", "int8"]
