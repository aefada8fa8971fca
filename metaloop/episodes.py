"""Episodic task construction: N-way K-shot Q-query episodes from small composable steps.

In the spirit of learn2learn's task transforms, a `Recipe` is a list of steps, each a small
object with one job, applied to a `Draft` in order:

    recipe = Recipe([FromDomains(["hr", "it"]), NWays(5), KShots(5, queries=5), RemapLabels()])
    episode = recipe.sample(pool, seed=13, index=0)

Sampling is a pure function of (seed, index): the same episode comes out in any process,
on any rank, on any machine, which is what lets the trainer resume mid-stream and lets two
models be compared on identical evaluation episodes.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import pandas as pd

from metaloop.errors import DataError


@dataclass(frozen=True)
class Episode:
    """One few-shot task as row ids; `labels[i]` is the name of class index i."""

    id: str
    domain: str
    labels: tuple[str, ...]
    support_ids: tuple[str, ...]
    support_y: tuple[int, ...]
    query_ids: tuple[str, ...]
    query_y: tuple[int, ...]

    @property
    def ways(self) -> int:
        return len(self.labels)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> "Episode":
        d = json.loads(line)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


ALL_SPLITS = "all"  # a split name that means every row of the domain, whatever its split


class Pool:
    """Curated rows indexed for sampling: (domain, split) -> label -> sorted row ids; the split
    `ALL_SPLITS` holds every row of the domain."""

    def __init__(self, table: pd.DataFrame):
        missing = {"id", "text", "label", "domain", "split"} - set(table.columns)
        if missing:
            raise DataError(f"curated table lacks columns {sorted(missing)}; re-run `metaloop curate`")
        self.text = dict(zip(table["id"], table["text"]))
        self.label = dict(zip(table["id"], table["label"]))
        index: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for rid, dom, split, lab in zip(table["id"], table["domain"], table["split"], table["label"]):
            index[(dom, split)][lab].append(rid)
            index[(dom, ALL_SPLITS)][lab].append(rid)
        # Sorted ids make sampling independent of the table's row order.
        self.index = {k: {lab: sorted(ids) for lab, ids in sorted(v.items())} for k, v in index.items()}

    @classmethod
    def from_parquet(cls, path: str | Path) -> "Pool":
        return cls(pd.read_parquet(path))

    def labels(self, domain: str, split: str) -> list[str]:
        return list(self.index.get((domain, split), {}))

    def rows(self, domain: str, split: str, label: str) -> list[str]:
        return self.index.get((domain, split), {}).get(label, [])

    def texts(self, ids: Iterable[str]) -> list[str]:
        return [self.text[i] for i in ids]


@dataclass
class Draft:
    """An episode under construction; each step fills in or rewrites part of it."""

    domain: str | None = None
    labels: list[str] = field(default_factory=list)
    support: dict[str, list[str]] = field(default_factory=dict)
    query: dict[str, list[str]] = field(default_factory=dict)
    order: list[str] | None = None  # class index order, set by RemapLabels


class Step(Protocol):
    def __call__(self, draft: Draft, pool: Pool, rng: random.Random) -> Draft: ...


@dataclass(frozen=True)
class FromDomains:
    """Pick the episode's domain: uniformly among `domains` (one domain = fixed)."""

    domains: Sequence[str]

    def __call__(self, draft: Draft, pool: Pool, rng: random.Random) -> Draft:
        return replace(draft, domain=rng.choice(sorted(self.domains)))


@dataclass(frozen=True)
class NWays:
    """Pick N labels of the domain present in `split`; `n` may be a [min, max] range or None (all)."""

    n: int | tuple[int, int] | None
    split: str = "train"

    def __call__(self, draft: Draft, pool: Pool, rng: random.Random) -> Draft:
        available = pool.labels(draft.domain, self.split)
        if self.n is None:
            return replace(draft, labels=available)
        n = self.n if isinstance(self.n, int) else rng.randint(*self.n)
        if n > len(available):
            raise DataError(
                f"domain {draft.domain!r} has {len(available)} labels in split {self.split!r}, "
                f"an episode needs {n}; lower episodes.ways or give the domain more labels"
            )
        return replace(draft, labels=sorted(rng.sample(available, n)))


@dataclass(frozen=True)
class KShots:
    """Pick K support rows per label, then Q query rows (None = every row of `query_split`).

    With one split for both, support and query are disjoint draws from it.
    """

    k: int
    queries: int | None = None
    support_split: str = "train"
    query_split: str = "train"

    def __call__(self, draft: Draft, pool: Pool, rng: random.Random) -> Draft:
        support, query = {}, {}
        same = self.support_split == self.query_split
        for label in draft.labels:
            rows = pool.rows(draft.domain, self.support_split, label)
            need = self.k + (self.queries or 0) if same else self.k
            if len(rows) < need:
                raise DataError(
                    f"domain {draft.domain!r}, label {label!r}: {len(rows)} rows in split "
                    f"{self.support_split!r}, an episode needs {need}; lower episodes.shots/queries "
                    "or add examples (curation quarantines such labels)"
                )
            if same:
                picked = rng.sample(rows, need)
                support[label], query[label] = picked[: self.k], picked[self.k :]
                if self.queries is None:
                    query[label] = [r for r in rows if r not in set(support[label])]
            else:
                support[label] = rng.sample(rows, self.k)
                q_rows = pool.rows(draft.domain, self.query_split, label)
                query[label] = q_rows if self.queries is None else rng.sample(q_rows, min(self.queries, len(q_rows)))
        return replace(draft, support=support, query=query)


@dataclass(frozen=True)
class RemapLabels:
    """Give classes indices 0..N-1 in a random order, so index carries no label identity."""

    shuffle: bool = True

    def __call__(self, draft: Draft, pool: Pool, rng: random.Random) -> Draft:
        order = list(draft.labels)
        if self.shuffle:
            rng.shuffle(order)
        return replace(draft, order=order)


@dataclass(frozen=True)
class Recipe:
    """Steps applied in order; `sample(pool, seed, index)` is deterministic in (seed, index)."""

    steps: Sequence[Step]
    name: str = "episode"

    def __add__(self, other: "Recipe | Step") -> "Recipe":
        more = other.steps if isinstance(other, Recipe) else [other]
        return Recipe([*self.steps, *more], self.name)

    def sample(self, pool: Pool, seed: int | str, index: int) -> Episode:
        # str seeds go through SHA-512 in `random`, so this is stable across processes
        # and independent of PYTHONHASHSEED.
        rng = random.Random(f"{self.name}:{seed}:{index}")
        draft = Draft()
        for step in self.steps:
            draft = step(draft, pool, rng)
        order = draft.order or list(draft.labels)
        s_ids, s_y, q_ids, q_y = [], [], [], []
        for y, label in enumerate(order):
            s_ids += draft.support[label]
            s_y += [y] * len(draft.support[label])
            q_ids += draft.query.get(label, [])
            q_y += [y] * len(draft.query.get(label, []))
        return Episode(
            id=f"{self.name}-{index}",
            domain=draft.domain,
            labels=tuple(order),
            support_ids=tuple(s_ids),
            support_y=tuple(s_y),
            query_ids=tuple(q_ids),
            query_y=tuple(q_y),
        )

    def stream(self, pool: Pool, seed: int | str, start: int = 0) -> Iterator[Episode]:
        index = start
        while True:
            yield self.sample(pool, seed, index)
            index += 1


# ---------------------------------------------------------------- manifests


def write_manifest(episodes: Iterable[Episode], path: Path) -> str:
    """Write episodes as JSON lines; return the sha256 of the file's content."""
    body = "".join(e.to_json() + "\n" for e in episodes)
    path.write_text(body, encoding="utf-8")
    return hashlib.sha256(body.encode()).hexdigest()


def read_manifest(path: str | Path) -> list[Episode]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: episode manifest not found; run `metaloop episodes` (or `dvc repro episodes`)")
    return [Episode.from_json(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
