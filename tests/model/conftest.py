"""Fixtures for the meta-learning tests: a tiny random BERT and a toy multi-domain project.

Everything is local and small: a 2-layer, 32-wide BERT with a character vocabulary, a few
hundred synthetic rows whose labels are told apart by keywords, episodes written with
`metaloop.episodes`. Threads are limited to one per process (the test machine has 2 cores).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from metaloop.backbone import tiny_bert
from metaloop.config import load_params
from metaloop.episodes import FromDomains, KShots, NWays, Pool, Recipe, RemapLabels, write_manifest
from metaloop.meta.data import EpisodeBatch, episode_batch

torch.set_num_threads(1)

# domain -> label -> keywords that identify it
TOPICS = {
    "shop": {"refund": "refund money back", "track": "where parcel track", "cancel": "cancel order stop",
             "size": "size fit small"},
    "bank": {"loan": "loan borrow rate", "card": "card lost stolen", "fee": "fee charge why",
             "open": "open new account"},
    "travel": {"book": "book flight seat", "bag": "bag luggage lost", "visa": "visa passport need",
               "hotel": "hotel room night"},
    "health": {"appt": "appointment doctor visit", "bill": "bill insurance pay", "rx": "refill pills pharmacy",
               "test": "test result lab"},
}
FILLER = ["please", "i", "you", "the", "a", "my", "can", "help", "need", "today", "now", "hi", "thanks"]


def toy_table(per_label: int = 10, seed: int = 0) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for domain, labels in TOPICS.items():
        for label, keys in labels.items():
            words = keys.split()
            for i in range(per_label):
                text = " ".join(rng.sample(words, 2) + rng.sample(FILLER, 2))
                rows.append({"id": f"{domain}-{label}-{i}", "text": text, "label": label, "domain": domain,
                             "split": "train", "source": "toy"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dropout_dir(tmp_path_factory) -> Path:
    """The tiny BERT with dropout 0.1, for runs whose randomness must replay on resume."""
    folder = tmp_path_factory.mktemp("tiny-bert-dropout")
    tiny_bert(folder, dropout=0.1)
    return folder


@pytest.fixture
def tiny(tiny_dir):
    """(model, tokenizer): a fresh copy of the tiny random BERT (float32, no dropout)."""
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)


def _toy_batch(tokenizer, domain: str = "shop", ways: int = 3, shots: int = 2, queries: int = 2,
              seed: int = 0, index: int = 0, label_names: bool = False) -> EpisodeBatch:
    pool = Pool(toy_table())
    ep = Recipe([FromDomains([domain]), NWays(ways), KShots(shots, queries=queries), RemapLabels()]).sample(
        pool, seed, index)
    return episode_batch(ep, pool.texts, tokenizer, max_length=32, label_names=label_names)


def _make_project(root: Path, tiny_dir: Path, **meta) -> Path:
    """Curated parquet + manifests + params.yaml under `root`; returns the params path."""
    data = root / "data"
    (data / "curated").mkdir(parents=True, exist_ok=True)
    (data / "episodes").mkdir(parents=True, exist_ok=True)
    table = toy_table()
    table.to_parquet(data / "curated" / "curated.parquet", index=False)
    pool = Pool(table)
    train = Recipe([FromDomains(["shop", "bank", "travel"]), NWays((2, 3)), KShots(2, queries=2), RemapLabels()],
                   name="meta-train")
    val = Recipe([FromDomains(["health"]), NWays(3), KShots(2, queries=3), RemapLabels()], name="meta-val")
    write_manifest([train.sample(pool, 13, i) for i in range(24)], data / "episodes" / "meta_train.jsonl")
    write_manifest([val.sample(pool, 13, i) for i in range(4)], data / "episodes" / "meta_val.jsonl")
    settings = {
        "algorithm": "fomaml", "adapt": "all", "inner_steps": 2, "inner_lr": 0.05, "outer_lr": 1e-3,
        "meta_batch_size": 4, "steps": 6, "checkpoint_every": 2, "val_every": 3, "val_episodes": 4,
        "patience": 5, "threads_per_rank": 1, "nproc": 2, "max_restarts": 0,
        "output_dir": str(root / "out"), **meta,
    }
    params = {
        "seed": 13,
        "domains": {"meta_train": ["shop", "bank", "travel"], "meta_val": ["health"], "target": ["other"]},
        "curation": {"output_dir": str(data / "curated")},
        "episodes": {"output_dir": str(data / "episodes")},
        "backbone": {"name_or_path": str(tiny_dir), "max_length": 32},
        "meta": settings,
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    load_params(path)  # fail here, not in a subprocess, if the file is invalid
    return path


def _subprocess_env() -> dict:
    root = Path(__file__).resolve().parents[2]
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


@pytest.fixture
def toy_batch():
    """toy_batch(tokenizer, domain="shop", ways=3, shots=2, queries=2, seed=0, index=0, label_names=False)"""
    return _toy_batch


@pytest.fixture
def project(tmp_path, tiny_dir):
    """project(name="run", backbone=tiny_dir, **meta_overrides) -> params.yaml of a toy project."""
    return lambda name="run", backbone=tiny_dir, **meta: _make_project(tmp_path / name, backbone, **meta)


@pytest.fixture(scope="session")
def sub_env():
    """Environment for subprocesses: one thread, offline, this checkout importable."""
    return _subprocess_env()


@pytest.fixture(scope="session")
def make_project():
    """make_project(root, backbone_dir, **meta_overrides) -> params.yaml path."""
    return _make_project
