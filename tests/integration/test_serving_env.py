"""A registered champion serves outside this repository: in a fresh virtualenv that has only
what the version's own requirements.txt lists, and over REST from `mlflow models serve`.

Real MLflow (SQLite registry), real pip installs into a new venv (from the same package
indexes `make setup` uses), a real HTTP server process on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from support import BIN, ROOT, free_port, tiny_classifier
from metaloop.adapt import Examples
from metaloop.compress import CompressParams, compress
from metaloop.config import Promotion
from tasks.registry import log_classifier, promote, register_version
from tasks.tracking import TAG, client, experiment_id, start_run

pytestmark = pytest.mark.slow
NAME = "metaloop-hotel"
NAME_FP32 = "metaloop-hotelfp"  # the same classifier registered with recipe fp32
LABELS = ["checkout", "shuttle", "towels"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A SQLite registry whose champion is an int8 (ONNX) classifier."""
    tmp = tmp_path_factory.mktemp("serving-env")
    old = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(tmp)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        fp32 = tiny_classifier(tmp / "fp32", LABELS)
        compress(fp32, tmp / "int8", "int8", CompressParams(recipes={"int8": ["int8"]}),
                 train=Examples(["shuttle at 6am", "more towels", "late checkout"], ["shuttle", "towels", "checkout"]),
                 max_length=32)
        c = client()
        run = start_run(c, experiment_id(c, "serving"), "domain hotel")
        source = log_classifier(c, run, tmp / "int8")
        tags = {TAG + "eval_hash": "e", TAG + "metrics": json.dumps({"accuracy": 90.0})}
        promote(c, NAME, register_version(c, NAME, source, run, tags), Promotion(alpha=None).policy())
        # registry.recipe: fp32 registers the torch folder itself: its own, larger environment
        run = start_run(c, experiment_id(c, "serving"), "domain hotel fp32")
        promote(c, NAME_FP32, register_version(c, NAME_FP32, log_classifier(c, run, fp32), run, tags),
                Promotion(alpha=None).policy())
        yield tmp, uri
    finally:
        os.chdir(old[0])
        if old[1] is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old[1]


def test_requirements_are_pinned_and_torch_free_for_onnx(registry):
    import mlflow.artifacts

    tmp, uri = registry
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", dst_path=str(tmp / "dl"),
                                                      tracking_uri=uri))
    reqs = [r for r in (local / "requirements.txt").read_text().splitlines() if r and not r.startswith("#")]
    names = {r.split("==")[0] for r in reqs}
    assert {"mlflow", "onnxruntime", "tokenizers", "numpy", "pandas"} <= names, reqs
    assert not names & {"torch", "transformers", "metaloop"}, reqs
    assert all("==" in r for r in reqs), reqs
    assert (local / "code" / "metaloop" / "onnx_runtime.py").is_file()  # the runtime travels with it


def pip_indexes() -> list[str]:
    """pip's own index settings (config files and PIP_* variables) as uv flags: torch comes from
    where `make setup` took it. pip takes the best match over all indexes, so uv does too."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    conf = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        conf[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    for key in ("index-url", "extra-index-url", "find-links"):
        env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        conf[key] = env or conf.get(key, "")
    flags = ["--index-strategy", "unsafe-best-match"]
    if conf["index-url"]:
        flags += ["--index-url", conf["index-url"]]
    flags += [f for url in conf["extra-index-url"].split() for f in ("--extra-index-url", url)]
    flags += [f for link in conf["find-links"].split() for f in ("--find-links", link)]
    return flags


@pytest.mark.parametrize("name, torch_needed", [(NAME, False), (NAME_FP32, True)], ids=["int8", "fp32"])
def test_champion_loads_and_predicts_in_a_fresh_venv(registry, name, torch_needed):
    tmp, uri = registry
    import mlflow.artifacts

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp / f"dl-{name}"),
                                                      tracking_uri=uri))
    venv = tmp / f"venv-{name}"
    # uv, one of the environment managers MLflow itself builds with (`--env-manager uv`):
    # seconds where pip takes a minute and a half for the torch recipe; the same indexes.
    subprocess.run([str(BIN / "uv"), "venv", "-q", str(venv), "--python", sys._base_executable], check=True)
    py = venv / "bin" / "python"
    proc = subprocess.run([str(BIN / "uv"), "pip", "install", "-q", "--python", str(py), *pip_indexes(),
                           "-r", str(local / "requirements.txt")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = (
        "import json, sys, mlflow.pyfunc;"
        f"m = mlflow.pyfunc.load_model('models:/{name}@champion');"
        "import metaloop;"
        "out = m.predict(['can the shuttle pick us up at 6am', 'more towels please'], params={'top_k': 2});"
        "one = m.predict('more towels please');"
        "import importlib.util as u;"
        "print(json.dumps([out.to_dict('records'), one.to_dict('records'), metaloop.__file__,"
        " u.find_spec('torch') is not None]))"
    )
    # -I: no PYTHONPATH, no user site, no current folder on the path; cwd outside the repo
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "MLFLOW_TRACKING_URI": uri, "HOME": str(tmp),
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run([str(py), "-I", "-c", code], capture_output=True, text=True, cwd=tmp, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds, one, runtime_file, has_torch = json.loads(proc.stdout.strip().splitlines()[-1])
    assert has_torch == torch_needed  # the int8 champion's environment has no torch at all
    assert not runtime_file.startswith(str(ROOT))  # the model's own copy, not this checkout
    assert all(p["label"] in LABELS and 0 < p["score"] <= 1 for p in preds + one)
    assert all(len(p["top_labels"]) == 2 and p["top_labels"][0] == p["label"] for p in preds)
    size_mb = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file()) / 1e6
    print(f"\nserving venv for {name}: {size_mb:.0f} MB")


def test_mlflow_models_serve_answers_invocations(registry):
    tmp, uri = registry
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()[-3000:]
                time.sleep(0.5)
        body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [["more towels please"], ["6am shuttle"]]},
                           "params": {"top_k": 3}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                     {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=30).read())
        rows = answer["predictions"]
        assert len(rows) == 2 and all(r["label"] in LABELS and 0 < r["score"] <= 1 for r in rows)
        assert all(sorted(r["top_labels"]) == sorted(LABELS) for r in rows)
        one = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     json.dumps({"inputs": ["late checkout please"]}).encode(),
                                     {"Content-Type": "application/json"})
        assert json.loads(urllib.request.urlopen(one, timeout=30).read())["predictions"][0]["label"] in LABELS
    finally:
        server.terminate()
        server.wait(timeout=30)


def _predict(tmp: Path, uri: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "metaloop"), "predict", *args], cwd=tmp, input=stdin, capture_output=True,
                          text=True, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, timeout=300)


def test_predict_cli_scores_files_stdin_and_one_text(registry):
    import pandas as pd

    tmp, uri = registry
    (tmp / "in.csv").write_text("id,text\n1,more towels please\n2,\"shuttle, at 6am\"\n3,late checkout\n")
    proc = _predict(tmp, uri, "hotel", "in.csv")
    assert proc.returncode == 0, proc.stderr[-2000:]
    import io

    got = pd.read_csv(io.StringIO(proc.stdout))
    assert list(got.columns) == ["id", "text", "label", "score"] and got["id"].tolist() == [1, 2, 3]
    assert set(got["label"]) <= set(LABELS) and "rows/s" in proc.stderr  # the throughput at the end

    (tmp / "in.jsonl").write_text("".join(json.dumps({"body": t, "k": i}) + "\n" for i, t in enumerate(["a", "b"])))
    proc = _predict(tmp, uri, "hotel", "in.jsonl", "--column", "body", "--out", "out.parquet", "--top-k", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_parquet(tmp / "out.parquet")
    assert table["k"].tolist() == [0, 1] and all(len(t) == 2 for t in table["top_labels"])

    proc = _predict(tmp, uri, "hotel", "-", stdin="more towels please\n\nlate checkout\n")
    assert proc.returncode == 0 and len(pd.read_csv(io.StringIO(proc.stdout))) == 2, proc.stderr[-2000:]
    proc = _predict(tmp, uri, "hotel", "--text", "more towels please", "--version", "1")
    label, prob = proc.stdout.strip().split("\t")
    assert proc.returncode == 0 and label in LABELS and 0 < float(prob) <= 1


@pytest.mark.parametrize("args, message", [
    (["nowhere", "--text", "hi"], "metaloop-nowhere: no 'champion' alias in the registry"),
    (["hotel", "--text", "hi", "--version", "9"], "version 9"),
    (["hotel", "missing.csv"], "missing.csv: file not found"),
    (["hotel", "bad.csv"], "no column 'text' (columns: body)"),
    (["hotel", "ragged.csv"], "ragged.csv:3: more fields than the header has"),
    (["hotel"], "give a FILE"),
])
def test_predict_cli_errors_name_the_fix(registry, args, message):
    tmp, uri = registry
    (tmp / "bad.csv").write_text("body\nhello\n")
    (tmp / "ragged.csv").write_text("text\nhello\nhi,there\n")
    proc = _predict(tmp, uri, *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    if args[0] == "nowhere":
        assert "domains with a champion: hotel" in proc.stderr
    assert "Traceback" not in proc.stderr


def _serve(tmp: Path, uri: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "METALOOP_SERVE_DOMAIN": "hotel", "PORT": str(port)}
    return subprocess.Popen(["sh", str(ROOT / "infra" / "serving" / "serve.sh"), "-h", "127.0.0.1"], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _labels_served(port: int, server: subprocess.Popen) -> set[str]:
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, server.stdout.read()[-3000:]
            time.sleep(0.5)
    body = json.dumps({"inputs": ["more towels please"], "params": {"top_k": 10}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
    return set(json.loads(urllib.request.urlopen(req, timeout=30).read())["predictions"][0]["top_labels"])


def test_the_serving_image_script_follows_the_alias_on_restart(registry):
    """infra/serving/serve.sh (the compose `serving` service's entry point) resolves
    @champion when it starts: after a promotion, a restart serves the new version."""
    tmp, uri = registry
    port = free_port()
    server = _serve(tmp, uri, port)
    try:
        assert _labels_served(port, server) == set(LABELS)
    finally:
        server.terminate()
        server.wait(timeout=30)
    c = client()
    new = ["alpha", "beta"]
    folder = tiny_classifier(tmp / "fp32-v2", new, seed=1)
    compress(folder, tmp / "int8-v2", "int8", CompressParams(recipes={"int8": ["int8"]}),
             train=Examples(["a", "b"], new), max_length=32)
    run = start_run(c, experiment_id(c, "serving"), "domain hotel v2")
    v2 = register_version(c, NAME, log_classifier(c, run, tmp / "int8-v2"), run, {})
    c.set_registered_model_alias(NAME, "champion", v2)
    try:
        server = _serve(tmp, uri, port)
        assert _labels_served(port, server) == set(new)
    finally:
        server.terminate()
        server.wait(timeout=30)
        c.set_registered_model_alias(NAME, "champion", "1")  # later tests expect v1 served


def test_a_torch_recipe_pins_the_cpu_torch_it_was_trained_with(registry):
    import mlflow.artifacts
    from importlib.metadata import version

    tmp, uri = registry
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME_FP32}@champion", dst_path=str(tmp / "dl-req"),
                                                      tracking_uri=uri))
    reqs = [r for r in (local / "requirements.txt").read_text().splitlines() if r and not r.startswith("#")]
    assert f"torch=={version('torch')}" in reqs and "+cpu" in version("torch"), reqs  # never the CUDA build
    assert {"transformers", "safetensors", "mlflow"} <= {r.split("==")[0] for r in reqs} and "metaloop" not in str(reqs)
    assert (local / "code" / "metaloop" / "compress" / "runtime.py").is_file()
