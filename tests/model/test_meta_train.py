"""Meta-training end to end: one process, torchrun with 2 ranks, SIGTERM + resume, elastic restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from metaloop.config import load_params
from metaloop.launch import torchrun_command
from metaloop.train import run


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l] if path.is_file() else []


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    pointer = json.loads((out / "checkpoints" / "latest.json").read_text())
    return load_file(out / "checkpoints" / pointer["dir"] / "weights.safetensors")


def _assert_same(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], atol=atol, rtol=0, msg=k)


def test_single_process_run_exports_a_loadable_model(project):
    from transformers import AutoModel, AutoTokenizer

    params = load_params(project(algorithm="metasgd", val_every=2))
    result = run(params)
    out = params.meta.output_dir
    assert result.step == 6 and not result.interrupted and result.world_size == 1
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert all({"train_loss", "train_acc"} <= r.keys() for r in rows[1:])
    assert {"val_loss", "val_acc"} <= rows[2].keys() and {"val_loss", "val_acc"} <= rows[0].keys()

    model_dir = out / "model"
    encoder = AutoModel.from_pretrained(model_dir)
    AutoTokenizer.from_pretrained(model_dir)
    head = json.loads((model_dir / "metaloop_head.json").read_text())
    assert head["algorithm"] == "metasgd" and head["pooling"] == "mean" and head["step"] == result.best_step
    lrs = load_file(model_dir / head["meta_sgd_lrs"])
    assert {"head.weight", "head.bias"} <= lrs.keys()
    # the export is the best checkpoint's encoder
    best = load_file(out / "checkpoints" / f"best-{result.best_step:08d}" / "weights.safetensors")
    for name, p in encoder.named_parameters():
        torch.testing.assert_close(p, best[f"encoder.model.{name}"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rank_digests"] == [result.digest]
    assert summary["device"] == "cpu" and summary["backend"] is None  # one process, no process group


def test_early_stopping_keeps_the_best_checkpoint(project):
    # outer_lr far below float32 resolution: parameters never change, so validation never improves
    params = load_params(project(outer_lr=1e-12, steps=20, val_every=2, patience=2))
    result = run(params)
    assert result.stopped_early and result.step == 4 and result.best_step == 0
    assert _metrics(params.meta.output_dir)[-1]["step"] == 4
    # a finished run is not redone: running again only re-exports
    again = run(params)
    assert again.resumed_from == 4 and again.step == 4


def test_changed_params_start_fresh(project):
    path = project()
    run(load_params(path))
    text = path.read_text().replace("inner_lr: 0.05", "inner_lr: 0.02")
    path.write_text(text)
    result = run(load_params(path))
    assert result.resumed_from is None and result.step == 6
    assert [r["step"] for r in _metrics(result.output_dir)] == [0, 1, 2, 3, 4, 5, 6]


# The real `python -m metaloop.train` entry point, with a gate in its `on_step` callback: after
# step 4 (a regular checkpoint) it writes `ready` and waits until SIGTERM has reached the
# trainer's own handler, so the signal always lands mid-run however fast the machine (no
# clock), and step 5 sees it: the checkpoint at 5 is the one SIGTERM asks for.
GATED_TRAINER = r"""
import signal, sys, time
from pathlib import Path
import metaloop.train as train

ready, params = Path(sys.argv[1]), sys.argv[2]
real_run = train.run

def gate(step, record):
    if step != 4:
        return
    trainer_handler = signal.getsignal(signal.SIGTERM)  # metaloop.train's own
    landed = []
    def handler(signum, frame):
        trainer_handler(signum, frame)
        landed.append(signum)
    signal.signal(signal.SIGTERM, handler)
    ready.write_text("4")
    deadline = time.time() + 120  # a guard against a hang, not a timing assumption
    while not landed and time.time() < deadline:
        time.sleep(0.01)  # sleep is interrupted by the signal; the handler runs at once
    signal.signal(signal.SIGTERM, trainer_handler)
    if not landed:
        sys.exit("the test never sent SIGTERM")

train.run = lambda p, **kw: real_run(p, on_step=gate, **kw)
sys.exit(train.main(["--params", params]))
"""


def test_sigterm_then_restart_matches_an_uninterrupted_run(project, tiny_dropout_dir, sub_env, tmp_path):
    settings = {"backbone": tiny_dropout_dir, "steps": 30, "checkpoint_every": 4, "val_every": 10, "inner_lr": 0.01}
    reference = run(load_params(project("reference", **settings)))

    path = project("interrupted", **settings)
    out = load_params(path).meta.output_dir
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", GATED_TRAINER, str(ready), str(path)], env=sub_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if not ready.exists():
        proc.kill()
        pytest.fail("the trainer never reached step 4\n" + proc.communicate()[0])
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, log
    stopped = json.loads((out / "checkpoints" / "latest.json").read_text())["step"]
    assert stopped == 5, log  # the step after the signal landed: checkpointed, then the run stopped
    assert [r["step"] for r in _metrics(out)] == [0, 1, 2, 3, 4, 5]
    assert not (out / "model").exists()

    resumed = run(load_params(path))
    assert resumed.resumed_from == stopped and resumed.step == 30
    _assert_same(resumed.learner.state_dict(), reference.learner.state_dict(), atol=1e-6)
    ref_rows, rows = _metrics(reference.output_dir), _metrics(out)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for a, b in zip(rows, ref_rows):
        for key in ("train_loss", "val_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, tiny_dir, make_project, sub_env):
    path = make_project(tmp_path_factory.mktemp("torchrun"), tiny_dir)
    params = load_params(path)
    cmd = torchrun_command(params, path)
    proc = subprocess.run(cmd, env=sub_env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return path, params


def test_torchrun_two_ranks_hold_identical_parameters(two_rank_run, tiny_dir, tmp_path, make_project):
    _, params = two_rank_run
    out = params.meta.output_dir
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 6
    assert summary["backend"] == "gloo" and summary["device"] == "cpu"  # chosen: no GPU here
    assert len(summary["rank_digests"]) == 2 and len(set(summary["rank_digests"])) == 1
    # and the result does not depend on the number of ranks (beyond float summation order)
    single = run(load_params(make_project(tmp_path / "single", tiny_dir)))
    _assert_same(_final_weights(out), single.learner.state_dict(), atol=1e-5)
    assert (out / "model" / "model.safetensors").is_file()


def test_torchrun_restarts_after_a_rank_dies(two_rank_run, tiny_dir, tmp_path, make_project, sub_env):
    path = make_project(tmp_path / "crash", tiny_dir, max_restarts=1)
    out = load_params(path).meta.output_dir
    entry = tmp_path / "crash_entry.py"
    entry.write_text(
        "import os, sys\n"
        "from metaloop.config import load_params\n"
        "from metaloop.train import run\n"
        "def on_step(step, record):\n"
        "    if step == 3 and os.environ['RANK'] == '1' and os.environ['TORCHELASTIC_RESTART_COUNT'] == '0':\n"
        "        os._exit(17)  # rank 1 dies after step 3; the last checkpoint is step 2\n"
        "run(load_params(sys.argv[1]), on_step=on_step)\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", str(entry), str(path)]
    proc = subprocess.run(cmd, env=sub_env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["step"] == 6
    assert len(set(summary["rank_digests"])) == 1
    _assert_same(_final_weights(out), _final_weights(two_rank_run[1].meta.output_dir), atol=1e-6)
    assert [r["step"] for r in _metrics(out)] == [0, 1, 2, 3, 4, 5, 6]


def test_torchrun_command_carries_rendezvous_settings(project):
    params = load_params(project(nnodes="2", nproc=4, rdzv_endpoint="head:29400", rdzv_id="job7",
                                 max_restarts=3))
    cmd = torchrun_command(params, "params.yaml")
    joined = " ".join(cmd)
    assert "--nnodes 2 --nproc-per-node 4 --max-restarts 3" in joined
    assert "--rdzv-backend c10d --rdzv-endpoint head:29400 --rdzv-id job7" in joined
    assert "--standalone" not in cmd
    assert cmd[-4:] == ["-m", "metaloop.train", "--params", "params.yaml"]


def test_preflight_names_missing_data_and_impossible_settings(project, tmp_path):
    from metaloop.errors import ConfigError, DataError
    from metaloop.train_inputs import preflight
    from metaloop.train import main

    path = project()
    params = load_params(path)
    preflight(params)
    (params.episodes.output_dir / "meta_train.jsonl").unlink()
    with pytest.raises(DataError, match="meta_train.jsonl"):
        preflight(params)
    assert main(["--params", str(path), "--launch"]) == 2
    with pytest.raises(ConfigError, match="reptile"):
        preflight(load_params(project("reptile", algorithm="reptile", adapt="lora")))


def test_a_config_error_in_a_rank_ends_the_job_at_once(tmp_path, make_project, sub_env):
    """A backbone that cannot load fails every attempt the same way: the rank records its
    message and stops torchrun's agent, instead of three elastic restarts (issue 28)."""
    from metaloop.errors import ConfigError
    from metaloop.launch import launch

    path = make_project(tmp_path / "bad", tmp_path / "no-such-backbone", max_restarts=2)
    proc = subprocess.run([sys.executable, "-m", "metaloop.train", "--params", str(path), "--launch"], env=sub_env,
                          capture_output=True, text=True, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # each attempt's two ranks print their error once: one attempt, not 1 + max_restarts
    assert 1 <= out.count("error: backbone.name_or_path=") <= 2, out[-3000:]
    assert "error: meta-training rank" in out  # and the launcher ends with the rank's message
    assert "Restarting" not in out and "restart" not in out.lower().replace("max-restarts", ""), out[-3000:]
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(ConfigError, match="meta-training rank .*no-such-backbone"):
            launch(path)  # the launching side raises the rank's own error, so it is not retried
    finally:
        os.chdir(old)
