"""What a meta-training run reads, checked before any rank starts: the meta-train and
meta-val manifests, the curated texts their rows point at, and the fingerprint a checkpoint
must match to be resumed.

    preflight(params)        # ConfigError / DataError now, not a torchrun exit status later
    curated, meta_train, meta_val, train_eps, val_eps, texts = read_inputs(params)
    stream = EpisodeStream(train_eps, params.seed)   # stream[i]: a pure function of (seed, i)
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pandas as pd

from metaloop.backbone import resolve
from metaloop.config import Params
from metaloop.episodes import Episode, read_manifest
from metaloop.errors import ConfigError, DataError


class EpisodeStream:
    """Position i of the endless meta-train stream -> an episode (a pure function of seed, i)."""

    def __init__(self, episodes: list[Episode], seed: int):
        self.episodes, self.seed = episodes, seed
        self._perm: tuple[int, list[int]] | None = None

    def __getitem__(self, i: int) -> Episode:
        n = len(self.episodes)
        epoch, pos = divmod(i, n)
        if self._perm is None or self._perm[0] != epoch:
            order = list(range(n))
            random.Random(f"metaloop-stream:{self.seed}:{epoch}").shuffle(order)
            self._perm = (epoch, order)
        return self.episodes[self._perm[1][pos]]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_texts(curated: Path, episodes: list[Episode]) -> dict[str, str]:
    if not curated.is_file():
        raise DataError(f"{curated}: curated dataset not found; run `metaloop curate` (or `dvc repro curate`)")
    try:
        table = pd.read_parquet(curated, columns=["id", "text"])
    except (KeyError, ValueError) as err:
        raise DataError(f"{curated}: cannot read columns id, text ({err}); re-run `metaloop curate`") from None
    texts = dict(zip(table["id"], table["text"]))
    missing = {i for e in episodes for i in (*e.support_ids, *e.query_ids)} - texts.keys()
    if missing:
        raise DataError(
            f"{len(missing)} episode row ids (e.g. {min(missing)!r}) are not in {curated}; the "
            "manifests are older than the curated data: re-run `metaloop episodes`"
        )
    return texts


def read_inputs(params: Params, curated=None, meta_train=None, meta_val=None):
    curated = Path(curated or params.curation.output_dir / "curated.parquet")
    meta_train = Path(meta_train or params.episodes.output_dir / "meta_train.jsonl")
    meta_val = Path(meta_val or params.episodes.output_dir / "meta_val.jsonl")
    train_eps = read_manifest(meta_train)
    if not train_eps:
        raise DataError(f"{meta_train}: no episodes; check domains.meta_train and re-run `metaloop episodes`")
    val_eps = read_manifest(meta_val)[: params.meta.val_episodes] if meta_val.is_file() else []
    texts = load_texts(curated, train_eps + val_eps)
    return curated, meta_train, meta_val, train_eps, val_eps, texts


def preflight(params: Params, **paths) -> None:
    """Raise ConfigError / DataError now for what would make every rank fail (missing data,
    unknown backbone, impossible algorithm/adapt pairs); call before launching torchrun,
    whose own exit status does not tell bad input from a crash."""
    m = params.meta
    resolve(params.backbone.name_or_path)
    if m.algorithm == "reptile" and m.adapt in ("head", "lora"):
        raise ConfigError(f"meta.algorithm=reptile with meta.adapt={m.adapt}: Reptile only moves adapted encoder "
                          "weights, so nothing would be meta-learned; use adapt all or top_k")
    read_inputs(params, **paths)


def fingerprint(params: Params, files: list[Path]) -> str:
    """What a checkpoint must match to be resumed: the math-relevant params and the data."""
    m = params.meta
    knobs = {
        "seed": params.seed,
        "backbone": params.backbone.model_dump(mode="json"),
        "meta": m.model_dump(mode="json", include={
            "algorithm", "adapt", "top_k", "lora_rank", "lora_targets", "inner_steps", "inner_lr",
            "outer_lr", "first_order", "meta_batch_size", "bf16", "max_grad_norm", "metric", "scale",
            "label_shots",
        }),
        "data": {p.name: sha256_of(p) for p in files if p.is_file()},
    }
    return hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()).hexdigest()
