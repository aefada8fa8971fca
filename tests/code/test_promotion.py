"""The promotion policy as a table of cases."""

import math

import pytest

from metaloop.config import Promotion
from metaloop.promotion import Beats, Budget, NoNaN, Scored, decide

POLICY = Promotion(margin=0.5, guarded={"accuracy_1shot": 1.0}, max_size_mb=10, max_p50_ms=5).policy()
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
