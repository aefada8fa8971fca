"""Registry behaviour against a real MLflow SQLite store: register, promote, crash, rollback, load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from support import run_cli, tiny_classifier
from metaloop.config import Promotion
from metaloop.promotion import decide
from tasks.registry import (CHALLENGER, CHAMPION, _alias, _scored, champion_to_rescore, download_classifier, list_models,
                            log_classifier, promote, record_scores, register_version, rollback)
from tasks.tracking import TAG, client, experiment_id, start_run

POLICY = Promotion(margin=0.5, guarded={"accuracy_1shot": 1.0}, alpha=None).policy()
NAME = "metaloop-hotel"


def new_version(c, tmp_path, accuracy: float, eval_hash: str = "e1", shot1: float = 80.0, log_model: bool = False,
                correct: str | None = None) -> str:
    run = start_run(c, experiment_id(c, "t"), "domain-hotel")
    source = f"runs:/{run}/model"
    if log_model:
        source = log_classifier(c, run, tiny_classifier(tmp_path / f"clf-{run}", ["checkout", "shuttle", "towels"]))
    tags = {TAG + "eval_hash": eval_hash, TAG + "metrics": json.dumps({"accuracy": accuracy, "accuracy_1shot": shot1}),
            TAG + "data_hash": "d1", TAG + "git_commit": "abc", TAG + "params_hash": "p1", TAG + "recipe": "fp32",
            TAG + "parent_run_id": run, **({TAG + "correct": correct} if correct else {})}
    return register_version(c, NAME, source, run, tags)


def test_first_version_becomes_champion_then_policy_decides(mlflow_sqlite, tmp_path):
    c = client()
    v1 = new_version(c, tmp_path, 90.0)
    assert _alias(c, NAME, CHALLENGER) == v1
    assert promote(c, NAME, v1, POLICY).reasons == ("no champion yet",)
    assert _alias(c, NAME, CHAMPION) == v1 and _alias(c, NAME, CHALLENGER) is None

    v2 = new_version(c, tmp_path, 90.2)  # within the margin
    decision = promote(c, NAME, v2, POLICY)
    assert not decision.promote and _alias(c, NAME, CHAMPION) == v1 and _alias(c, NAME, CHALLENGER) == v2
    tags = c.get_model_version(NAME, v2).tags
    assert tags[TAG + "decision"] == "keep" and "below the margin" in tags[TAG + "reasons"]

    v3 = new_version(c, tmp_path, 92.0)
    assert promote(c, NAME, v3, POLICY).promote
    assert _alias(c, NAME, CHAMPION) == v3
    assert c.get_model_version(NAME, v3).tags[TAG + "previous_champion"] == v1

    assert rollback(c, NAME) == v1
    assert _alias(c, NAME, CHAMPION) == v1
    assert c.get_model_version(NAME, v1).tags[TAG + "restored_from"] == v3


def test_significance_reads_the_per_query_records_from_the_versions(mlflow_sqlite, tmp_path):
    from metaloop.promotion import outcome_record

    policy = Promotion(margin=0.5).policy()  # alpha 0.05, as shipped
    c = client()
    champ_rows = [True] * 56 + [False] * 10
    promote(c, NAME, new_version(c, tmp_path, 84.85, correct=outcome_record(champ_rows)), policy)
    one_more = [True] * 57 + [False] * 9  # +1.5 points: past the margin, one row
    v2 = new_version(c, tmp_path, 86.36, correct=outcome_record(one_more))
    decision = promote(c, NAME, v2, policy)
    assert not decision.promote and "not significant" in c.get_model_version(NAME, v2).tags[TAG + "reasons"]
    six_more = [True] * 62 + [False] * 4
    v3 = new_version(c, tmp_path, 93.94, correct=outcome_record(six_more))
    assert promote(c, NAME, v3, policy).promote and _alias(c, NAME, CHAMPION) == v3


def test_a_champion_rescored_on_new_episodes_is_compared_on_them(mlflow_sqlite, tmp_path):
    from metaloop.promotion import outcome_record

    policy = Promotion(margin=0.5).policy()
    c = client()
    v1 = new_version(c, tmp_path, 90.0, eval_hash="old", log_model=True)  # scored on other episodes, no record
    promote(c, NAME, v1, policy)
    assert champion_to_rescore(c, NAME, "old") == v1  # no per-query record
    assert champion_to_rescore(c, NAME, "new") == v1
    assert (download_classifier(c, NAME, v1, tmp_path / "dl") / "config.json").is_file()
    v2 = new_version(c, tmp_path, 93.94, eval_hash="new", correct=outcome_record([True] * 62 + [False] * 4))
    before = decide(_scored(c, NAME, v2), _scored(c, NAME, v1, "new"), policy)
    assert not before.promote and "different set" in before.reasons[0]

    record_scores(c, NAME, v1, "new", {"accuracy": 84.85}, outcome_record([True] * 56 + [False] * 10))
    assert champion_to_rescore(c, NAME, "new") is None
    assert promote(c, NAME, v2, policy).promote and _alias(c, NAME, CHAMPION) == v2
    assert json.loads(c.get_model_version(NAME, v1).tags[TAG + "metrics"])["accuracy"] == 90.0  # its own, kept


def test_different_eval_set_is_not_compared(mlflow_sqlite, tmp_path):
    c = client()
    promote(c, NAME, new_version(c, tmp_path, 90.0), POLICY)
    v2 = new_version(c, tmp_path, 99.0, eval_hash="e2")
    assert "different set" in promote(c, NAME, v2, POLICY).reasons[0]


def test_crash_before_alias_move_leaves_champion_and_rerun_finishes(mlflow_sqlite, tmp_path):
    c = client()
    v1 = new_version(c, tmp_path, 90.0)
    promote(c, NAME, v1, POLICY)
    v2 = new_version(c, tmp_path, 95.0)

    def crash():
        raise RuntimeError("killed mid-promotion")

    with pytest.raises(RuntimeError):
        promote(c, NAME, v2, POLICY, before_alias_move=crash)
    assert _alias(c, NAME, CHAMPION) == v1 and _alias(c, NAME, CHALLENGER) == v2
    assert promote(c, NAME, v2, POLICY).promote
    assert _alias(c, NAME, CHAMPION) == v2


def test_rerunning_promotion_is_a_no_op(mlflow_sqlite, tmp_path):
    c = client()
    promote(c, NAME, new_version(c, tmp_path, 90.0), POLICY)
    v2 = new_version(c, tmp_path, 90.1)
    first = promote(c, NAME, v2, POLICY)
    tags = c.get_model_version(NAME, v2).tags
    assert promote(c, NAME, v2, POLICY) == first
    assert c.get_model_version(NAME, v2).tags == tags


def test_champion_loads_in_a_fresh_process_and_predicts(mlflow_sqlite, tmp_path):
    c = client()
    promote(c, NAME, new_version(c, tmp_path, 90.0, log_model=True), POLICY)
    code = (
        "import mlflow.pyfunc, json;"
        f"m = mlflow.pyfunc.load_model('models:/{NAME}@champion');"
        "out = m.predict(['can the shuttle pick us up at 6am', 'more towels please']);"
        "ex = m.input_example;"
        "one = m.predict('more towels please');"
        "print(json.dumps([out.to_dict('records'), ex['text'].tolist(), m.predict(ex).to_dict('records'),"
        " one.to_dict('records')]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Add type hints" not in proc.stderr  # MLflow's warning at the model code's class definition
    preds, example, example_pred, one = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(preds) == 2 and len(one) == 1 and one[0]["label"] in {"checkout", "shuttle", "towels"}
    assert all(p["label"] in {"checkout", "shuttle", "towels"} and 0 < p["score"] <= 1 for p in preds)
    # the registry's input example (and REST serving example): the first label's name, which predicts
    assert example == ["checkout"] and example_pred[0]["label"] in {"checkout", "shuttle", "towels"}
    # Weights travel as safetensors, never as a pickle.
    files = [f.path for f in c.list_artifacts(c.get_model_version(NAME, "1").run_id, "model/artifacts/" +
             c.list_artifacts(c.get_model_version(NAME, "1").run_id, "model/artifacts")[0].path.split("/")[-1])]
    assert any(f.endswith("model.safetensors") for f in files) and not any(f.endswith((".pkl", ".bin", ".pt")) for f in files)


def test_cli_models_promote_rollback(mlflow_sqlite, tmp_path):
    from metaloop.promotion import outcome_record
    from support import ROOT

    c = client()  # params.yaml's policy tests significance, so the versions carry per-query records
    v1 = new_version(c, tmp_path, 84.85, correct=outcome_record([True] * 56 + [False] * 10))

    params = str(ROOT / "params.yaml")
    out = run_cli("metaloop", "promote", "--params", params, "--domain", "hotel", cwd=tmp_path).stdout
    assert "hotel: v1 promote" in out
    new_version(c, tmp_path, 93.94, correct=outcome_record([True] * 62 + [False] * 4))
    run_cli("metaloop", "promote", "--params", params, cwd=tmp_path)
    rows = json.loads(run_cli("metaloop", "models", "--json", "--params", params, cwd=tmp_path).stdout)
    assert rows[0]["domain"] == "hotel" and rows[0]["champion"] == "2" and rows[0]["challenger"] is None
    assert rows[0]["tags"][TAG + "previous_champion"] == v1
    assert "champion is now v1" in run_cli("metaloop", "rollback", "hotel", "--params", params, cwd=tmp_path).stdout
    assert list_models(c, "metaloop")[0].champion == "1"
    again = run_cli("metaloop", "rollback", "hotel", "--params", params, cwd=tmp_path, check=False)
    assert again.returncode == 2 and "nothing to roll back" in again.stderr


# ---------------------------------------------------------------- edge cases (issue 27)


def test_a_decision_is_replayed_only_against_the_champion_it_was_made_against(mlflow_sqlite, tmp_path):
    c = client()
    v1 = new_version(c, tmp_path, 90.0)
    promote(c, NAME, v1, POLICY)
    v2 = new_version(c, tmp_path, 95.0)

    def crash():
        raise RuntimeError("killed mid-promotion")

    with pytest.raises(RuntimeError):  # decided "promote" against v1, then the process died
        promote(c, NAME, v2, POLICY, before_alias_move=crash)
    assert c.get_model_version(NAME, v2).tags[TAG + "decided_against"] == v1
    v3 = new_version(c, tmp_path, 97.0)  # meanwhile a better version became champion
    assert promote(c, NAME, v3, POLICY).promote and _alias(c, NAME, CHAMPION) == v3

    again = promote(c, NAME, v2, POLICY)  # v2's recorded "promote" was against v1, not v3: decide again
    assert not again.promote and again.champion == v3
    assert again.reasons == ("accuracy 95.00 vs champion 97.00: gain -2.00 below the margin 0.50",)
    tags = c.get_model_version(NAME, v2).tags
    assert tags[TAG + "decision"] == "keep" and tags[TAG + "decided_against"] == v3
    assert TAG + "previous_champion" not in tags
    assert _alias(c, NAME, CHAMPION) == v3


class _DiesBeforeClearingTheChallenger(MlflowClient):
    """A real client on the same store whose process 'dies' right after `champion` moved:
    the challenger alias is still on the new champion."""

    def delete_registered_model_alias(self, name, alias):
        if alias == CHALLENGER:
            raise SystemExit("killed between the champion move and the challenger cleanup")
        return super().delete_registered_model_alias(name, alias)


def test_a_crash_after_the_champion_moved_is_finished_by_the_rerun(mlflow_sqlite, tmp_path):
    c = client()
    v1 = new_version(c, tmp_path, 90.0)
    promote(c, NAME, v1, POLICY)
    v2 = new_version(c, tmp_path, 95.0)
    dying = _DiesBeforeClearingTheChallenger(tracking_uri=mlflow_sqlite, registry_uri=mlflow_sqlite)
    with pytest.raises(SystemExit):
        promote(dying, NAME, v2, POLICY)
    # the state such a crash leaves: v2 is champion (the decision and lineage written first) and still challenger
    assert _alias(c, NAME, CHAMPION) == v2 and _alias(c, NAME, CHALLENGER) == v2
    assert c.get_model_version(NAME, v2).tags[TAG + "previous_champion"] == v1

    rerun = promote(c, NAME, v2, POLICY)  # the rerun completes the interrupted move
    assert rerun.promote and rerun.reasons == ("already champion",)
    assert _alias(c, NAME, CHAMPION) == v2 and _alias(c, NAME, CHALLENGER) is None
    assert [(r.champion, r.challenger) for r in list_models(c, "metaloop")] == [(v2, None)]
    assert rollback(c, NAME) == v1  # and the lineage the crash left is whole


def test_rollback_tags_both_versions_and_needs_a_champion(mlflow_sqlite, tmp_path):
    import re

    from metaloop.errors import MetaloopError

    c = client()
    with pytest.raises(MetaloopError, match=rf"^{NAME}: has no champion to roll back$"):
        rollback(c, NAME)  # not even registered
    v1 = new_version(c, tmp_path, 90.0)  # registered, still only a challenger
    with pytest.raises(MetaloopError, match=rf"^{NAME}: has no champion to roll back$"):
        rollback(c, NAME)
    assert _alias(c, NAME, CHALLENGER) == v1 and _alias(c, NAME, CHAMPION) is None

    promote(c, NAME, v1, POLICY)
    v2 = new_version(c, tmp_path, 92.0)
    promote(c, NAME, v2, POLICY)
    assert rollback(c, NAME) == v1 and _alias(c, NAME, CHAMPION) == v1
    rolled, restored = c.get_model_version(NAME, v2).tags, c.get_model_version(NAME, v1).tags
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rolled[TAG + "rolled_back_at"])
    assert restored[TAG + "restored_from"] == v2 and TAG + "rolled_back_at" not in restored
    assert TAG + "restored_from" not in rolled
