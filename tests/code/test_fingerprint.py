"""Per-model fingerprints: which params and which data shape which model (metaloop/fingerprint.py)."""

from __future__ import annotations

import pytest
import yaml

from support import ROOT
from metaloop.config import parse_params
from metaloop.fingerprint import domain_fingerprint, meta_fingerprint

MANIFEST = {
    "rows_hash_by_domain": {"a": "ra", "b": "rb", "t1": "r1", "t2": "r2"},
    "eval_hash_by_domain": {"t1": "e1", "t2": "e2"},
    "files": {"meta_train.jsonl": "mt", "meta_val.jsonl": "mv", "eval.jsonl": "ev"},
}


def params(**edits):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["domains"] = {"meta_train": ["a"], "meta_val": ["b"], "target": ["t1", "t2"]}
    for dotted, value in edits.items():
        *path, key = dotted.split(".")
        node = raw
        for p in path:
            node = node[p]
        node[key] = value
    return parse_params(raw)


def both(p, manifest=MANIFEST, init="1", code="c"):
    return meta_fingerprint(p, manifest, code).digest, domain_fingerprint(p, manifest, "t1", init, code).digest


@pytest.mark.parametrize("edit, meta_moves, domain_moves", [
    ({"adapt.epochs": 3}, False, True),
    ({"compress.distill.layers": 3}, False, True),
    ({"promotion.margin": 1.0}, False, True),
    ({"registry.recipe": "fp32"}, False, True),
    ({"meta.steps": 31}, True, False),  # a domain moves through the new init version instead
    ({"episodes.shots": 2}, True, False),
    ({"backbone.max_length": 32}, True, True),
    ({"seed": 14}, True, True),
    ({"episodes.eval_draws": 3}, False, False),  # reaches a domain through its eval hash only
    ({"adapt.output_dir": "elsewhere"}, False, False),
    ({"meta.output_dir": "elsewhere"}, False, False),
    ({"flow.max_workers": 1}, False, False),
    ({"curation.max_chars": 100}, False, False),  # reaches the models through their rows hashes
])
def test_each_params_section_shapes_only_its_models(edit, meta_moves, domain_moves):
    meta0, dom0 = both(params())
    meta1, dom1 = both(params(**edit))
    assert (meta1 != meta0, dom1 != dom0) == (meta_moves, domain_moves)


def test_data_parts_follow_their_own_domains():
    p = params()
    meta0, dom0 = both(p)
    other_target = {**MANIFEST, "rows_hash_by_domain": {**MANIFEST["rows_hash_by_domain"], "t2": "changed"},
                    "eval_hash_by_domain": {**MANIFEST["eval_hash_by_domain"], "t2": "changed"}}
    assert both(p, other_target) == (meta0, dom0)
    own = {**MANIFEST, "rows_hash_by_domain": {**MANIFEST["rows_hash_by_domain"], "t1": "changed"}}
    assert both(p, own) == (meta0, both(p, own)[1]) and both(p, own)[1] != dom0
    meta_rows = {**MANIFEST, "rows_hash_by_domain": {**MANIFEST["rows_hash_by_domain"], "b": "changed"}}
    assert both(p, meta_rows)[0] != meta0 and both(p, meta_rows)[1] == dom0
    assert both(p, init="2")[1] != dom0 and both(p, code="d") != (meta0, dom0)


def test_changes_name_each_part_that_moved():
    p = params()
    old = domain_fingerprint(p, MANIFEST, "t1", "1", "c")
    new_manifest = {**MANIFEST, "rows_hash_by_domain": {**MANIFEST["rows_hash_by_domain"], "t1": "x"}}
    new = domain_fingerprint(params(**{"adapt.epochs": 3}), new_manifest, "t1", "2", "c")
    assert new.changes(old.tags()) == ["rows changed", "init v1 -> v2", "params changed"]
    assert new.matches(new.tags()) and not new.matches(old.tags())
    assert new.changes({}) == ["no fingerprint recorded (built by an older metaloop)"]
