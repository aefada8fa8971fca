"""Meta-training on a CUDA GPU: NCCL chosen under torchrun, the same math as on the CPU, bf16 autocast.

Skipped where torch sees no GPU (CI has none). On a GPU machine:

    python -m pytest tests/model/test_meta_train_cuda.py

Two ranks need two GPUs (NCCL refuses two ranks on one device); with one GPU the torchrun
test runs one rank, which still goes through NCCL's process group and all-reduce.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from metaloop.config import load_params

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _weights(out) -> dict[str, torch.Tensor]:
    """The last checkpoint's weights (where latest.json points, as test_meta_train reads them)."""
    pointer = json.loads((out / "checkpoints" / "latest.json").read_text())
    return load_file(out / "checkpoints" / pointer["dir"] / "weights.safetensors")


def _losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return [r["train_loss"] for r in rows if "train_loss" in r]


def test_torchrun_on_gpu_uses_nccl_and_matches_the_cpu_run(tmp_path, tiny_dir, make_project, sub_env):
    from metaloop.launch import torchrun_command

    ranks = min(2, torch.cuda.device_count())
    gpu = load_params(make_project(tmp_path / "gpu", tiny_dir, nproc=ranks))
    _run(torchrun_command(gpu, tmp_path / "gpu" / "params.yaml"), sub_env)
    summary = json.loads((gpu.meta.output_dir / "summary.json").read_text())
    assert summary["backend"] == "nccl" and summary["device"].startswith("cuda") and summary["step"] == 6
    assert len(set(summary["rank_digests"])) == 1 and len(summary["rank_digests"]) == ranks

    # The same project on the CPU (the GPU hidden): the same episodes and math, so the same
    # losses and weights up to float summation order across devices.
    cpu = load_params(make_project(tmp_path / "cpu", tiny_dir, nproc=1))
    _run([sys.executable, "-m", "metaloop.train", "--params", str(tmp_path / "cpu" / "params.yaml")],
         {**sub_env, "CUDA_VISIBLE_DEVICES": ""})
    assert json.loads((cpu.meta.output_dir / "summary.json").read_text())["device"] == "cpu"
    assert _losses(gpu.meta.output_dir) == pytest.approx(_losses(cpu.meta.output_dir), rel=1e-3, abs=1e-4)
    on_gpu, on_cpu = _weights(gpu.meta.output_dir), _weights(cpu.meta.output_dir)
    assert on_gpu.keys() == on_cpu.keys()
    for name in on_cpu:
        torch.testing.assert_close(on_gpu[name], on_cpu[name], atol=2e-3, rtol=1e-3, msg=name)


@pytest.mark.parametrize("algorithm", ["maml", "protonet"])
def test_bf16_autocast_trains_on_gpu_and_exports_fp32(tmp_path, tiny_dir, make_project, algorithm):
    from transformers import AutoModel

    from metaloop.train import run

    params = load_params(make_project(tmp_path, tiny_dir, algorithm=algorithm, bf16=True, steps=6, nproc=1))
    result = run(params)
    assert result.device.startswith("cuda") and result.step == 6
    losses = _losses(params.meta.output_dir)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert result.best_val_acc is not None and 0.0 <= result.best_val_acc <= 1.0
    encoder = AutoModel.from_pretrained(result.model_dir)
    assert all(p.dtype == torch.float32 for p in encoder.parameters())  # autocast, not bf16 weights
