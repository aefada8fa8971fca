"""params.yaml loads into typed models; bad settings are rejected with the key named."""

from pathlib import Path

import pytest
import yaml

from support import ROOT, run_cli
from metaloop.config import Params, load_params, parse_params
from metaloop.errors import ConfigError


def base() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_shipped_params_load():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.sources[0].kind == "packaged"
    assert set(params.domains.target).isdisjoint(params.domains.meta_train)


@pytest.mark.parametrize(
    "edit, key, hint",
    [
        (lambda p: p["episodes"].update(shots=0), "episodes.shots", "greater than 0"),
        (lambda p: p["episodes"].update(shots="five"), "episodes.shots", "integer"),
        (lambda p: p["episodes"].update(ways=[6, 3]), "episodes.ways", "min <= max"),
        (lambda p: p["episodes"].update(ways="every"), "episodes.ways", "'all'"),
        (lambda p: p["curation"].update(maxchars=10), "curation.maxchars", "unknown key"),
        (lambda p: p.update(surprise=1), "surprise", "unknown key"),
        (lambda p: p["curation"].update(test_fraction=0.7, val_fraction=0.4), "curation", "must be < 1"),
        (lambda p: p["sources"].append({"kind": "ftp"}), "sources.1", "allowed: packaged, file, huggingface, s3"),
        (lambda p: p["sources"].append({"kind": "s3", "uri": "bucket/key"}), "sources.1.s3.uri", "s3://bucket/key"),
        (lambda p: p["meta"].update(metric="manhattan"), "meta.metric", "'sqeuclidean' or 'cosine'"),
        (lambda p: p["meta"].update(label_shots=-1), "meta.label_shots", "greater than or equal to 0"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(edit, key, hint):
    raw = base()
    edit(raw)
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert key in str(err.value) and hint in str(err.value)


def test_domain_with_two_roles_is_rejected():
    raw = base()
    raw["domains"]["target"].append(raw["domains"]["meta_train"][0])
    with pytest.raises(ConfigError, match=r"listed in both domains.meta_train and domains.target"):
        parse_params(raw)


def test_missing_params_file_says_how_to_fix(tmp_path: Path):
    with pytest.raises(ConfigError, match="--params"):
        load_params(tmp_path / "nope.yaml")


def test_cli_params_prints_resolved_configuration(tmp_path: Path):
    raw = base()
    del raw["curation"]  # defaults must be filled in
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = run_cli("metaloop", "params", "--params", str(path)).stdout
    resolved = yaml.safe_load(out)
    assert resolved["curation"]["max_chars"] == 512
    assert resolved["domains"] == raw["domains"]


def test_cli_rejects_bad_params_with_exit_2(tmp_path: Path):
    raw = base()
    raw["episodes"]["queries"] = -1
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = run_cli("metaloop", "params", "--params", str(path), check=False)
    assert proc.returncode == 2
    assert "episodes.queries" in proc.stderr and "Traceback" not in proc.stderr
