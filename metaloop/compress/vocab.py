"""Vocabulary trimming: keep the embedding rows of the tokens a domain uses.

MiniLM's 30,522 x 384 word-embedding table is about half of its 22.7M parameters, while a
domain's texts use a few thousand tokens. `trim_vocab` keeps

* every token the domain's texts tokenize to (train, unlabelled, validation texts),
* the special tokens ([PAD], [UNK], [CLS], [SEP], [MASK], added tokens),
* the fallback: single characters and their `##` continuations (`keep_chars`: all of the
  vocabulary's, only ASCII ones, or only characters seen in the texts),
* optionally the `keep_frequent` first ordinary tokens of the vocabulary: BERT's WordPiece
  vocabulary is ordered by corpus frequency ("the", "of", "and", ... from id 1996), so these
  are the most common English words, which keeps words that the domain's training texts
  miss but its traffic will use from being spelled out ([unusedN] placeholders are skipped),

renumbered in their original order, and rewrites the tokenizer to match.

Why known words round-trip exactly: WordPiece splits a word greedily by the longest prefix
in the vocabulary. Every piece the full vocabulary chose for a kept text is kept, and any
longer prefix in the trimmed vocabulary was in the full one too, so greedy matching picks
the same pieces. An unseen word whose pieces were dropped falls back to shorter kept pieces,
at worst single characters, instead of [UNK] (characters outside the kept set do become
[UNK]). Only WordPiece tokenizers (the BERT family) are supported.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from metaloop.errors import ConfigError

_UNUSED = re.compile(r"^\[unused\d+\]$")


def _char_tokens(vocab: dict[str, int], keep_chars: str, seen: set[str], prefix: str) -> set[str]:
    out = set()
    for tok in vocab:
        ch = tok[len(prefix):] if tok.startswith(prefix) and len(tok) == len(prefix) + 1 else (tok if len(tok) == 1 else None)
        if ch is None:
            continue
        if keep_chars == "all" or (keep_chars == "ascii" and ch.isascii()) or ch in seen:
            out.add(tok)
    return out


def _remap_special(node, new_id: dict[int, int]):
    """Rewrite special-token ids inside a post-processor description (any nesting)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "ids" and isinstance(v, list):
                out[k] = [new_id[i] for i in v]
            elif k in ("sep", "cls") and isinstance(v, list) and len(v) == 2 and isinstance(v[1], int):
                out[k] = [v[0], new_id[v[1]]]
            else:
                out[k] = _remap_special(v, new_id)
        return out
    if isinstance(node, list):
        return [_remap_special(x, new_id) for x in node]
    return node


def trim_vocab(
    model: nn.Module,
    tokenizer,
    texts: Iterable[str],
    *,
    keep_chars: str = "ascii",
    keep_frequent: int = 0,
    max_positions: int | None = None,
):
    """(model, tokenizer, info): `model` modified in place, a new tokenizer, what was kept."""
    from transformers import AutoTokenizer

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    wp = spec.get("model", {})
    if wp.get("type") != "WordPiece":
        raise ConfigError(
            f"trim_vocab supports WordPiece tokenizers (BERT family); this one is {wp.get('type')!r}. "
            "Remove trim_vocab from the recipe"
        )
    vocab: dict[str, int] = wp["vocab"]
    prefix = wp.get("continuing_subword_prefix", "##")
    texts = list(texts)
    used: set[int] = set()
    for i in range(0, len(texts), 512):
        for ids in tokenizer(texts[i : i + 512], add_special_tokens=False)["input_ids"]:
            used.update(ids)
    special = set(tokenizer.all_special_ids) | {t["id"] for t in spec.get("added_tokens", [])}
    normaliser = tokenizer.backend_tokenizer.normalizer
    seen = set("".join(normaliser.normalize_str(t) for t in texts)) if normaliser else set("".join(texts))
    chars = {vocab[t] for t in _char_tokens(vocab, keep_chars, seen, prefix)}
    frequent: set[int] = set()
    if keep_frequent:
        for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]):
            if len(frequent) >= keep_frequent:
                break
            if i in special or _UNUSED.match(tok) or len(tok.removeprefix(prefix)) == 1:
                continue
            frequent.add(i)
    kept = sorted(used | special | chars | frequent)
    new_id = {old: new for new, old in enumerate(kept)}
    inverse = {i: t for t, i in vocab.items()}

    # tokenizer: same normaliser, pre-tokenizer and decoder; vocabulary and special ids renumbered
    spec["model"]["vocab"] = {inverse[old]: new_id[old] for old in kept}
    for tok in spec.get("added_tokens", []):
        tok["id"] = new_id[tok["id"]]
    if spec.get("post_processor"):
        spec["post_processor"] = _remap_special(spec["post_processor"], new_id)
    spec["padding"] = None  # set per call by transformers
    spec["truncation"] = None
    tmp = Path(tempfile.mkdtemp(prefix="metaloop-vocab-"))
    try:
        tokenizer.save_pretrained(tmp)
        for stale in ("vocab.txt", "tokenizer.json"):
            (tmp / stale).unlink(missing_ok=True)
        (tmp / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        cfg_path = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if "added_tokens_decoder" in cfg:
            cfg["added_tokens_decoder"] = {str(new_id[int(k)]): v for k, v in cfg["added_tokens_decoder"].items()}
        if max_positions:
            cfg["model_max_length"] = max_positions
        cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        new_tokenizer = AutoTokenizer.from_pretrained(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if len(new_tokenizer.get_vocab()) != len(kept):
        raise RuntimeError(f"trimmed tokenizer has {len(new_tokenizer.get_vocab())} tokens, expected {len(kept)}")

    # model: keep the embedding rows in the new order
    old = model.get_input_embeddings()
    pad = model.config.pad_token_id
    new_pad = new_id.get(pad) if pad is not None else None
    emb = nn.Embedding(len(kept), old.embedding_dim, padding_idx=new_pad, dtype=old.weight.dtype)
    with torch.no_grad():
        emb.weight.copy_(old.weight[torch.tensor(kept)])
    model.set_input_embeddings(emb)
    model.config.vocab_size = len(kept)
    model.config.pad_token_id = new_pad
    info = {"vocab_before": len(vocab), "vocab_after": len(kept), "used_tokens": len(used),
            "fallback_tokens": len(chars - used), "frequent_tokens": len(frequent - used - chars),
            "keep_chars": keep_chars}
    if max_positions:
        info["positions"] = trim_positions(model, max_positions)
    return model, new_tokenizer, info


def trim_positions(model: nn.Module, max_positions: int) -> int:
    """Keep the first `max_positions` learned position embeddings (inputs are truncated to them)."""
    emb = model.base_model.embeddings
    pos = getattr(emb, "position_embeddings", None)
    if pos is None or pos.num_embeddings <= max_positions:
        return pos.num_embeddings if pos is not None else 0
    offset = (getattr(model.config, "pad_token_id", 0) or 0) + 1 if model.config.model_type in ("roberta", "xlm-roberta") else 0
    n = max_positions + offset
    new = nn.Embedding(n, pos.embedding_dim, dtype=pos.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(pos.weight[:n])
    emb.position_embeddings = new
    for name in ("position_ids", "token_type_ids"):
        buf = getattr(emb, name, None)
        if isinstance(buf, torch.Tensor) and buf.dim() == 2 and buf.shape[1] > n:
            emb.register_buffer(name, buf[:, :n].clone(), persistent=False)
    model.config.max_position_embeddings = n
    return n
