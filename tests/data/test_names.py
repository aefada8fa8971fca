"""Names and text from untrusted sources (issue 23): one rule for domain and label names,
invisible text is empty, control characters are removed and counted, paths cannot escape."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from support import ROOT
from metaloop.config import parse_params
from metaloop.curate import CurationRules, clean
from metaloop.config import Domains
from metaloop.errors import ConfigError
from metaloop.names import domain_problem, is_empty_text, label_problem, under
from metaloop.sources import RawRow

RULES = CurationRules(max_chars=200, test_fraction=0.0, val_fraction=0.0,
                      domains=Domains(meta_train=["d"], target=["t"]),
                      needs={"meta_train": (1, 0), "meta_val": (1, 1), "target": (1, 1)})


def raw(text, label="a", domain="d", row=1) -> RawRow:
    return RawRow(text=text, label=label, domain=domain, split="train", source="s", row=row)


@pytest.mark.parametrize("name", ["hospitality", "it_helpdesk", "billing-eu", "v2.queue", "A1"])
def test_ordinary_domain_names_pass(name):
    assert domain_problem(name) is None


@pytest.mark.parametrize("name", ["../../somewhere", "a/b", "..", ".hidden", "", "x" * 65, "with space",
                                  "caf\u00e9", "-dash", "a\u200bb", "tab\there"])
def test_hostile_domain_names_are_refused(name):
    assert domain_problem(name)


def test_meta_is_reserved_for_targets_only():
    # a target `meta` would be registered as <prefix>-meta, the init's model; CLINC150 has a
    # `meta` domain that meta-trains or meta-validates, which is never registered
    assert domain_problem("meta", target=True) and domain_problem("META", target=True)
    assert domain_problem("meta") is None


@given(st.text(max_size=80))
@settings(max_examples=300, deadline=None)
def test_a_path_built_from_any_name_stays_under_its_root(tmp_path_factory, name):
    root = tmp_path_factory.getbasetemp() / "root"
    root.mkdir(exist_ok=True)
    try:
        path = under(root, name, "int8")
    except ValueError:
        return
    assert path.resolve().is_relative_to(root.resolve()) and path.parent.name == name


def test_a_symlink_out_of_the_root_is_refused(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "escape").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="outside"):
        under(tmp_path / "root", "escape", "x")


def test_curation_quarantines_bad_names_and_invisible_text_and_counts_control_characters():
    rows = [
        raw("a fine row", row=1), raw("another fine row", row=2),
        raw("escape attempt", domain="../../somewhere", row=3),
        raw("a slash in the domain", domain="a/b", row=4),
        raw("\u200b\u200c\u2060\ufeff", row=5),  # zero-width and format characters only
        raw("\x00\x07 \u200b", row=6),  # control characters only
        raw("bell\x07 inside\x00 text", row=7),  # kept: the two control characters removed
        raw("label with a zero width", label="a\u200bb", row=8),
    ]
    kept, quarantined, stats = clean(rows, RULES)
    assert stats["rows_in"] == len(rows) == len(kept) + len(quarantined)
    why = {q["row"]: q["reason"] for q in quarantined}
    assert why == {3: "bad_domain_name", 4: "bad_domain_name", 5: "empty_text", 6: "empty_text",
                   8: "bad_label_name"}
    assert "somewhere" in next(q["detail"] for q in quarantined if q["row"] == 3)
    assert "bell inside text" in {k["text"] for k in kept}
    assert stats["control_chars_removed"] == {"rows": 1, "chars": 2}


@pytest.mark.parametrize("role, name, hint", [
    ("target", "meta", "reserved"), ("target", "../../x", "breaks the rule"), ("meta_train", "a b", "breaks the rule"),
    ("meta_val", "../x", "breaks the rule"),
])
def test_params_refuse_bad_and_reserved_domain_names(role, name, hint):
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["domains"][role] = [*p["domains"][role], name]
    with pytest.raises(ConfigError, match=rf"domains\.{role}.*{hint}"):
        parse_params(p)


def test_params_refuse_domains_that_differ_only_in_case():
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["domains"]["target"] = [*p["domains"]["target"], "Hospitality"]
    with pytest.raises(ConfigError, match="differ only in case"):
        parse_params(p)


def test_empty_means_empty_to_a_reader():
    assert is_empty_text("\u200b \u00a0\u2028\x00")
    assert not is_empty_text("\u200bhi")
    assert label_problem("ok label") is None and label_problem("x" * 101)
    assert Path(under(Path("/tmp"), "a")).name == "a"
