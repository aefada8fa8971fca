"""The promotion policy as a table of cases."""

import math

import pytest

from metaloop.config import Promotion
from metaloop.promotion import (Beats, Budget, NoNaN, Scored, Significant, decide, outcome_record, read_outcomes,
                                sign_test_p)

# The margin, budget and guard checks; significance has its own tests below.
POLICY = Promotion(margin=0.5, guarded={"accuracy_1shot": 1.0}, max_size_mb=10, max_p50_ms=5, alpha=None).policy()
CHAMP = Scored("1", "h1", {"accuracy": 90.0, "accuracy_1shot": 80.0, "size_mb": 8.0, "p50_ms_batch1": 4.0})


def cand(eval_hash="h1", **metrics) -> Scored:
    return Scored("2", eval_hash, {**CHAMP.metrics, **metrics})


@pytest.mark.parametrize(
    "candidate, champion, promote, reason",
    [
        (cand(), None, True, "no champion yet"),
        (cand(accuracy=91.0), CHAMP, True, "passes every check against champion v1"),
        (cand(accuracy=90.5), CHAMP, True, "passes every check"),  # exactly the margin
        (cand(accuracy=90.3), CHAMP, False, "gain +0.30 below the margin 0.50"),  # tie within margin
        (cand(accuracy=90.0), CHAMP, False, "gain +0.00 below the margin"),
        (cand(accuracy=89.0), CHAMP, False, "gain -1.00 below the margin"),
        (cand(accuracy=math.nan), CHAMP, False, "['accuracy'] are NaN"),
        (cand(accuracy=math.nan), None, False, "are NaN"),  # even with no champion
        (cand("h2", accuracy=95.0), CHAMP, False, "evaluated on a different set"),
        (cand(accuracy=95.0, size_mb=12.0), CHAMP, False, "size_mb 12.00 over budget 10.00"),
        (cand(accuracy=95.0, p50_ms_batch1=6.0), None, False, "p50_ms_batch1 6.00 over budget 5.00"),
        (cand(accuracy=95.0, accuracy_1shot=78.5), CHAMP, False, "accuracy_1shot regressed by 1.50"),
        (cand(accuracy=95.0, accuracy_1shot=79.5), CHAMP, True, "passes"),  # within tolerance
    ],
)
def test_policy_table(candidate, champion, promote, reason):
    decision = decide(candidate, champion, POLICY)
    assert decision.promote is promote
    assert any(reason in r for r in decision.reasons), decision.reasons


def test_every_failure_is_reported():
    decision = decide(cand("h2", accuracy=math.nan, size_mb=99.0), CHAMP, POLICY)
    assert len(decision.reasons) >= 3 and not decision.promote


def test_checks_compose_with_and():
    policy = NoNaN() & Budget(max_size_mb=1.0) & Beats("accuracy", 0.0)
    assert len(policy.checks) == 3
    assert decide(cand(size_mb=0.5, accuracy=90.1), CHAMP, policy).promote


def test_outcome_record_round_trips_with_its_length():
    right = [True, False, True, True] + [False] * 9  # trailing misses must survive
    assert read_outcomes(outcome_record(right)) == right
    assert read_outcomes(outcome_record([])) == []


def test_sign_test_p_values():
    assert sign_test_p(5, 0) == 1 / 32
    assert sign_test_p(0, 0) == 1.0  # no disagreement: no evidence
    assert sign_test_p(1, 1) == 0.75
    assert sign_test_p(0, 3) == 1.0


def scored(version: str, right: list[bool], accuracy: float | None = None) -> Scored:
    acc = 100.0 * sum(right) / len(right) if accuracy is None else accuracy
    return Scored(version, "h1", {"accuracy": acc}, outcome_record(right))


# 66 queries, as the packaged hospitality domain has: the champion gets 56 right.
CHAMP_ROWS = [True] * 56 + [False] * 10


@pytest.mark.parametrize(
    "flips_right, flips_wrong, promote, reason",
    [
        (1, 0, False, "1 queries newly right, 0 newly wrong, sign test p = 0.500"),  # +1.5 points, one row
        (3, 2, False, "p = 0.500"),  # net +1 row out of five disagreements
        (4, 0, False, "p = 0.062"),
        (5, 0, True, "passes"),  # p = 1/32
    ],
)
def test_significance_needs_more_than_a_row_or_two(flips_right, flips_wrong, promote, reason):
    champ_rows = CHAMP_ROWS
    cand_rows = list(champ_rows)
    wrong_idx = [i for i, ok in enumerate(champ_rows) if not ok][:flips_right]
    right_idx = [i for i, ok in enumerate(champ_rows) if ok][:flips_wrong]
    for i in wrong_idx:
        cand_rows[i] = True
    for i in right_idx:
        cand_rows[i] = False
    policy = Promotion(margin=0.5).policy()  # the shipped default: alpha 0.05
    decision = decide(scored("2", cand_rows), scored("1", champ_rows), policy)
    assert decision.promote is promote, decision.reasons
    assert any(reason in r for r in decision.reasons), decision.reasons


def test_significance_without_records_names_the_fix():
    old_champion = Scored("1", "h1", {"accuracy": 90.0})  # registered before records were kept
    failures = Significant(0.05).failures(scored("2", [True] * 10), old_champion)
    assert failures and "v1" in failures[0] and "promotion.alpha: null" in failures[0]
    assert Significant(0.05).failures(scored("2", [True] * 10), None) == []  # first version: nothing to beat
    short = Significant(0.05).failures(scored("2", [True] * 10), scored("1", [False] * 9))
    assert "differ in length" in short[0]


def test_alpha_null_leaves_the_margin_alone():
    assert not any(isinstance(c, Significant) for c in Promotion(alpha=None).policy().checks)
    assert any(c == Significant(0.05) for c in Promotion().policy().checks)


# ---------------------------------------------------------------- edge cases (issue 27)

MARGIN_0 = Promotion(margin=0.0, alpha=None).policy()


@pytest.mark.parametrize("accuracy, promote", [(90.0, False), (90.0 + 1e-12, False), (90.01, True)])
def test_a_tie_at_margin_zero_never_promotes(accuracy, promote):
    decision = decide(cand(accuracy=accuracy), CHAMP, MARGIN_0)
    assert decision.promote is promote, decision.reasons
    if not promote:
        assert decision.reasons == ("accuracy 90.00 vs champion 90.00: gain +0.00 below the margin 0.00",)


def test_a_tie_with_identical_per_query_records_is_not_significant_either():
    rows = [True] * 60 + [False] * 6
    decision = decide(scored("2", rows), scored("1", rows), Promotion(margin=0.0).policy())
    assert not decision.promote
    assert any("gain +0.00 below the margin 0.00" in r for r in decision.reasons)
    assert any("0 queries newly right, 0 newly wrong, sign test p = 1.000" in r for r in decision.reasons)


def without(scored_: Scored, key: str) -> Scored:
    return Scored(scored_.version, scored_.eval_hash, {k: v for k, v in scored_.metrics.items() if k != key})


def with_(scored_: Scored, **metrics) -> Scored:
    return Scored(scored_.version, scored_.eval_hash, {**scored_.metrics, **metrics})


GUARDED = Promotion(margin=0.5, guarded={"accuracy_1shot": 1.0}, alpha=None).policy()


@pytest.mark.parametrize("candidate, champion, reasons", [
    # the promotion metric cannot be compared: keep the champion, say which side and why
    (without(cand(accuracy=95.0), "accuracy"), CHAMP,
     ["metric 'accuracy' missing on candidate v2, so the champion cannot be compared"]),
    (cand(accuracy=95.0), without(CHAMP, "accuracy"),
     ["metric 'accuracy' missing on champion v1, so the champion cannot be compared"]),
    (cand(accuracy=None), CHAMP,
     ["metric(s) ['accuracy'] are NaN or infinite", "metric 'accuracy' is None on candidate v2, so the champion "
      "cannot be compared"]),
    (cand(accuracy=95.0), with_(CHAMP, accuracy=None),
     ["metric 'accuracy' is None on champion v1, so the champion cannot be compared"]),
    (cand(accuracy=math.inf), CHAMP,
     ["metric(s) ['accuracy'] are NaN or infinite", "metric 'accuracy' is inf on candidate v2, so the champion "
      "cannot be compared"]),
    # a champion at -inf would be "beaten" by anything: the comparison is refused instead
    (cand(accuracy=95.0), with_(CHAMP, accuracy=-math.inf),
     ["metric 'accuracy' is -inf on champion v1, so the champion cannot be compared"]),
    (cand(accuracy=95.0), with_(CHAMP, accuracy=math.nan),
     ["metric 'accuracy' is nan on champion v1, so the champion cannot be compared"]),
    # a guarded metric missing (or unusable) on one side: the guard cannot be checked, so it holds
    (without(cand(accuracy=95.0), "accuracy_1shot"), CHAMP,
     ["guarded metric 'accuracy_1shot' missing on candidate v2, so a regression cannot be ruled out (remove it "
      "from promotion.guarded to promote without this guard)"]),
    (cand(accuracy=95.0), without(CHAMP, "accuracy_1shot"),
     ["guarded metric 'accuracy_1shot' missing on champion v1, so a regression cannot be ruled out (remove it "
      "from promotion.guarded to promote without this guard)"]),
    (cand(accuracy=95.0), with_(CHAMP, accuracy_1shot=None),
     ["guarded metric 'accuracy_1shot' is None on champion v1, so a regression cannot be ruled out (remove it "
      "from promotion.guarded to promote without this guard)"]),
])
def test_unusable_metrics_keep_the_champion_and_say_why(candidate, champion, reasons):
    decision = decide(candidate, champion, GUARDED)
    assert decision.promote is False
    assert list(decision.reasons) == reasons


def test_with_no_champion_only_nan_and_budgets_apply():
    # nothing to compare with: a missing metric is no reason to wait (the meta init of a run
    # without meta-val episodes has no accuracy), but a None or infinite one still is
    assert decide(without(cand(), "accuracy"), None, GUARDED).reasons == ("no champion yet",)
    assert decide(without(cand(), "accuracy_1shot"), None, GUARDED).promote
    assert not decide(cand(accuracy=None), None, GUARDED).promote
    assert not decide(cand(accuracy=-math.inf), None, GUARDED).promote
