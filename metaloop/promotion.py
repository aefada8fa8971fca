"""Promotion policy: may a candidate model replace the champion? A pure function.

A policy is small checks composed with `&`, each returning what it found wrong:

    policy = NoNaN() & Budget(max_size_mb=9.1) & SameEvalSet() & Beats("accuracy", margin=0.5) \
        & Significant(alpha=0.05) & NoRegression({"accuracy_1shot": 1.0})
    decision = decide(candidate, champion, policy)

With no champion, only the checks that need none apply (NaN, budgets). The registry task
moves aliases only after `decide` says yes, and writes `decision.reasons` to the version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence


@dataclass(frozen=True)
class Scored:
    """A model version as the policy sees it: its metrics on one evaluation set."""

    version: str
    eval_hash: str
    metrics: Mapping[str, float]
    correct: str | None = None  # which evaluation queries it got right (`outcome_record`)


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: tuple[str, ...]
    candidate: str
    champion: str | None

    def summary(self) -> str:
        verdict = "promote" if self.promote else "keep champion"
        return f"{verdict}: " + "; ".join(self.reasons)


class Check(Protocol):
    def failures(self, cand: Scored, champ: Scored | None) -> list[str]: ...


class _Composable:
    def __and__(self, other: Check) -> "AllOf":
        return AllOf([*_parts(self), *_parts(other)])

    def failures(self, cand: Scored, champ: Scored | None) -> list[str]:  # pragma: no cover
        raise NotImplementedError


def _parts(check: Check) -> list[Check]:
    return list(check.checks) if isinstance(check, AllOf) else [check]


@dataclass(frozen=True)
class AllOf(_Composable):
    checks: list[Check] = field(default_factory=list)

    def failures(self, cand: Scored, champ: Scored | None) -> list[str]:
        return [f for c in self.checks for f in c.failures(cand, champ)]


def _unusable(key: str, *scored: Scored) -> list[str]:
    """Why `key` cannot be compared on these versions: missing, None, NaN or infinite."""
    out = []
    for s, side in zip(scored, ("candidate", "champion")):
        if key not in s.metrics:
            out.append(f"{key!r} missing on {side} v{s.version}")
        elif not isinstance(s.metrics[key], (int, float)) or not math.isfinite(s.metrics[key]):
            out.append(f"{key!r} is {s.metrics[key]!r} on {side} v{s.version}")
    return out


@dataclass(frozen=True)
class NoNaN(_Composable):
    def failures(self, cand: Scored, champ: Scored | None) -> list[str]:
        bad = sorted(k for k, v in cand.metrics.items() if v is None or not math.isfinite(v))
        return [f"metric(s) {bad} are NaN or infinite"] if bad else []


@dataclass(frozen=True)
class Budget(_Composable):
    """Upper limits on cost metrics (None = no limit)."""

    max_size_mb: float | None = None
    max_p50_ms: float | None = None

    def failures(self, cand: Scored, champ: Scored | None) -> list[str]:
        out = []
        for key, limit in (("size_mb", self.max_size_mb), ("p50_ms_batch1", self.max_p50_ms)):
            value = cand.metrics.get(key)
            if limit is not None and value is not None and value > limit:
                out.append(f"{key} {value:.2f} over budget {limit:.2f}")
        return out


@dataclass(frozen=True)
class SameEvalSet(_Composable):
    def failures(self, cand: Scored, champ: Scored | None) -> list[str]:
        if champ is None or cand.eval_hash == champ.eval_hash:
            return []
        return [
            f"evaluated on a different set (eval hash {cand.eval_hash[:12]} vs champion's {champ.eval_hash[:12]}); "
            "re-score the champion on the current episodes before comparing"
        ]


@dataclass(frozen=True)
class Beats(_Composable):
    """The candidate's `metric` must exceed the champion's by at least `margin` (higher is better).

    Metrics are percentages, so margin=0.5 means half an accuracy point.
    """

    metric: str = "accuracy"
    margin: float = 0.0

    def failures(self, cand: Scored, champ: Scored | None) -> list[str]:
        if champ is None:
            return []
        unusable = _unusable(self.metric, cand, champ)
        if unusable:
            return [f"metric {u}, so the champion cannot be compared" for u in unusable]
        gain = cand.metrics[self.metric] - champ.metrics[self.metric]
        # A tie never promotes (swapping equals only churns); 1e-9 absorbs float noise.
        if gain > 1e-9 and gain >= self.margin - 1e-9:
            return []
        return [f"{self.metric} {cand.metrics[self.metric]:.2f} vs champion {champ.metrics[self.metric]:.2f}: "
                f"gain {gain:+.2f} below the margin {self.margin:.2f}"]


def outcome_record(right: Sequence[bool]) -> str:
    """Per-query outcomes as text for a registry tag: 'n:hex' (bit i set = query i right).

    Two records compare only on the same evaluation set (`SameEvalSet`), which fixes the
    queries and their order."""
    bits = 0
    for i, ok in enumerate(right):
        bits |= int(bool(ok)) << i
    return f"{len(right)}:{bits:x}"


def read_outcomes(record: str) -> list[bool]:
    n, _, hexbits = record.partition(":")
    bits = int(hexbits or "0", 16)
    return [bool(bits >> i & 1) for i in range(int(n))]


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided exact sign test (McNemar's exact test) on the discordant queries: the chance
    of at least `wins` of them going the candidate's way if neither model were better."""
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n if n else 1.0


@dataclass(frozen=True)
class Significant(_Composable):
    """The candidate's gain must be more than luck: on the queries where the two models
    disagree, the candidate must win significantly more often (exact sign test, p <= alpha).

    A margin in points alone cannot tell a real gain from a row or two on a small test set
    (on 66 queries, 0.5 points is less than one row). Needs both versions' per-query records.
    """

    alpha: float = 0.05

    def failures(self, cand: Scored, champ: Scored | None) -> list[str]:
        if champ is None:
            return []
        missing = [f"v{s.version}" for s in (cand, champ) if not s.correct]
        if missing:
            return [f"no per-query record on {', '.join(missing)} (registered before metaloop kept one), so "
                    "significance cannot be tested; set promotion.alpha: null to promote on the margin alone"]
        a, b = read_outcomes(cand.correct), read_outcomes(champ.correct)
        if len(a) != len(b):
            return [f"per-query records differ in length ({len(a)} vs {len(b)}); re-score the champion"]
        wins = sum(x and not y for x, y in zip(a, b))
        losses = sum(y and not x for x, y in zip(a, b))
        p = sign_test_p(wins, losses)
        if p <= self.alpha:
            return []
        return [f"gain not significant: {wins} queries newly right, {losses} newly wrong, "
                f"sign test p = {p:.3f} > alpha {self.alpha}"]


@dataclass(frozen=True)
class NoRegression(_Composable):
    """Guarded metrics (higher is better) may drop at most their tolerance below the champion."""

    tolerances: Mapping[str, float] = field(default_factory=dict)

    def failures(self, cand: Scored, champ: Scored | None) -> list[str]:
        if champ is None:
            return []
        out = []
        for key, tol in sorted(self.tolerances.items()):
            unusable = _unusable(key, cand, champ)
            if unusable:  # a guard that cannot be checked keeps the champion, as Beats does
                out += [f"guarded metric {u}, so a regression cannot be ruled out (remove it from "
                        "promotion.guarded to promote without this guard)" for u in unusable]
                continue
            drop = champ.metrics[key] - cand.metrics[key]
            if drop > tol:
                out.append(f"{key} regressed by {drop:.2f} (tolerance {tol:.2f})")
        return out


def decide(candidate: Scored, champion: Scored | None, policy: Check) -> Decision:
    """Apply the policy; the reasons say why, either way."""
    failures = policy.failures(candidate, champion)
    if failures:
        return Decision(False, tuple(failures), candidate.version, champion and champion.version)
    if champion is None:
        reason = "no champion yet"
    else:
        reason = "passes every check against champion v" + champion.version
    return Decision(True, (reason,), candidate.version, champion and champion.version)
