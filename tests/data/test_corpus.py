"""The packaged corpus: big enough, varied, hand-written, and not copied from public data."""

import itertools
import json
import statistics
from collections import defaultdict

import pytest

from support import ROOT
from metaloop.config import PackagedSource
from metaloop.curate import normalise
from metaloop.sources import read_source

CLINC = ROOT.parent / "shared" / "data" / "clinc150"


@pytest.fixture(scope="module")
def by_intent() -> dict[tuple[str, str], list[str]]:
    out = defaultdict(list)
    for row in read_source(PackagedSource(kind="packaged"), 0):
        out[(row.domain, row.label)].append(row.text)
    return out


def words(text: str) -> set[str]:
    return set(normalise(text).casefold().replace("?", " ").replace(".", " ").replace(",", " ").split())


def test_size(by_intent):
    domains = {d for d, _ in by_intent}
    assert len(domains) >= 10
    for d in domains:
        assert sum(1 for dd, _ in by_intent if dd == d) >= 8, d
    for key, texts in by_intent.items():
        distinct = {normalise(t).casefold() for t in texts}
        assert len(distinct) >= 30, key
    assert sum(map(len, by_intent.values())) >= 2400


def test_no_near_copies_within_an_intent(by_intent):
    worst = []
    for key, texts in by_intent.items():
        sets = [words(t) for t in texts]
        for (i, a), (j, b) in itertools.combinations(enumerate(sets), 2):
            if len(a | b) >= 4 and len(a & b) / len(a | b) > 0.7:
                worst.append((key, texts[i], texts[j]))
    assert not worst, worst[:5]


def test_varied_length_and_register(by_intent):
    for domain in {d for d, _ in by_intent}:
        texts = [t for (d, _), ts in by_intent.items() if d == domain for t in ts]
        lengths = [len(t.split()) for t in texts]
        assert sum(n <= 5 for n in lengths) / len(texts) >= 0.08, domain  # short fragments
        assert sum(n > 15 for n in lengths) / len(texts) >= 0.10, domain  # long messages
        assert statistics.pstdev(lengths) >= 4, domain
        assert sum(t.rstrip().endswith("?") for t in texts) >= 0.1 * len(texts), domain  # questions
        assert sum(t == t.lower() for t in texts) >= 0.1 * len(texts), domain  # casual lowercase
        first_words = [t.split()[0].lower() for t in texts]
        assert max(first_words.count(w) for w in set(first_words)) <= 0.2 * len(texts), domain


def test_license_is_stated():
    assert "CC BY 4.0" in (ROOT / "metaloop" / "corpus" / "LICENSE").read_text()


@pytest.mark.skipif(not CLINC.is_dir(), reason="../shared/data/clinc150 not present")
def test_zero_exact_overlap_with_clinc150(by_intent):
    public = set()
    for f in CLINC.glob("*.jsonl"):
        for line in f.read_text(encoding="utf-8").splitlines():
            public.add(" ".join(json.loads(line)["text"].casefold().split()))
    ours = {" ".join(t.casefold().split()) for ts in by_intent.values() for t in ts}
    assert len(public) > 20000
    assert not ours & public, sorted(ours & public)[:10]
