"""Resumable checkpoints and the exported model, both written atomically.

    <output_dir>/checkpoints/
        latest.json                 {"step": 50, "dir": "step-00000050"}   (replaced atomically)
        step-00000050/              weights.safetensors, optimizer.pt, rng.pt, state.json
        best-00000040/              weights.safetensors, state.json        (best meta-validation)
    <output_dir>/model/             the exported encoder (see `export_model`)

Every folder is written under a temporary name and renamed into place, and `latest.json`
is replaced only after its folder is complete, so a job killed at any instant leaves the
previous checkpoint intact. Tensors are safetensors; the optimizer and RNG states are
`torch.save`d dicts of tensors and numbers, read back with `weights_only=True`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from metaloop.atomic import commit_dir, fresh_tmp

LATEST = "latest.json"
HEAD_CONFIG = "metaloop_head.json"
META_SGD_LRS = "meta_sgd_lrs.safetensors"
LORA_ADAPTER = "lora_adapter"


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpoints:
    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    # ---- reading
    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        try:
            folder = self.root / json.loads(pointer.read_text(encoding="utf-8"))["dir"]
            if (folder / "state.json").is_file():
                return folder
        except (OSError, ValueError, KeyError):
            pass
        done = sorted(p for p in self.root.glob("step-*") if (p / "state.json").is_file())
        return done[-1] if done else None

    @staticmethod
    def state(folder: Path) -> dict:
        return json.loads((folder / "state.json").read_text(encoding="utf-8"))

    @staticmethod
    def load(folder: Path, learner: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Load weights (and optimizer state) from `folder`; return its state dict and RNG list."""
        load_model(learner, str(folder / "weights.safetensors"), device=str(next(learner.parameters()).device))
        if optimizer is not None and (folder / "optimizer.pt").is_file():
            optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu"))
        state = Checkpoints.state(folder)
        rng = folder / "rng.pt"
        state["rng"] = torch.load(rng, weights_only=True) if rng.is_file() else None
        return state

    # ---- writing (rank 0 only)
    def save(self, step: int, learner: nn.Module, optimizer, state: dict, rng: list) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}"
        tmp = fresh_tmp(self.root / name)
        save_model(learner, str(tmp / "weights.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng, tmp / "rng.pt")
        _write_json(tmp / "state.json", {**state, "step": step})
        commit_dir(tmp, self.root / name)
        _write_json(self.root / LATEST, {"step": step, "dir": name})
        self._prune(keep_best=state.get("best", {}) or {})
        return self.root / name

    def save_best(self, step: int, learner: nn.Module, metrics: dict) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"best-{step:08d}"
        tmp = fresh_tmp(self.root / name)
        save_model(learner, str(tmp / "weights.safetensors"))
        _write_json(tmp / "state.json", {**metrics, "step": step})
        commit_dir(tmp, self.root / name)
        return self.root / name

    def best(self, step: int | None) -> Path | None:
        folder = self.root / f"best-{step:08d}" if step is not None else None
        return folder if folder is not None and (folder / "state.json").is_file() else None

    def discard_after(self, step: int) -> None:
        """Drop folders from beyond `step` (written by a run that was then lost)."""
        for p in [*self.root.glob("step-*"), *self.root.glob("best-*")]:
            if int(p.name.split("-")[1]) > step:
                shutil.rmtree(p, ignore_errors=True)

    def wipe(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _prune(self, keep_best: dict) -> None:
        steps = sorted(self.root.glob("step-*"))
        for p in steps[: -self.keep]:
            shutil.rmtree(p, ignore_errors=True)
        best_step = keep_best.get("step")
        for p in self.root.glob("best-*"):
            if best_step is None or int(p.name.split("-")[1]) < best_step:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict:
    import random

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- export


def export_model(learner, tokenizer, folder: str | Path, info: dict) -> Path:
    """Write the meta-learned encoder where `AutoModel.from_pretrained(folder)` loads it.

    folder/config.json + model.safetensors   the encoder (for LoRA: the base, which with its
                                              zero-initialised B matrices is the meta-learned init)
    folder/tokenizer files
    folder/metaloop_head.json                 head, pooling, algorithm and inner-loop settings
    folder/meta_sgd_lrs.safetensors          Meta-SGD learned step sizes (metasgd only)
    folder/lora_adapter/                      peft adapter initialisation (adapt=lora only)
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_tmp(folder)
    model = learner.encoder.model
    extra = {}
    if hasattr(model, "peft_config"):
        model.save_pretrained(tmp / LORA_ADAPTER)
        copy.deepcopy(model).unload().save_pretrained(tmp)
        extra["lora_adapter"] = LORA_ADAPTER
    else:
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if hasattr(learner, "learned_lrs"):
        save_file({k: v.contiguous().cpu() for k, v in learner.learned_lrs().items()}, str(tmp / META_SGD_LRS))
        extra["meta_sgd_lrs"] = META_SGD_LRS
    head = {
        "head": "proto-linear",
        "head_init": "W_k = 2*c_k, b_k = -||c_k||^2 from the support prototypes c_k (Proto-MAML)",
        "pooling": learner.encoder.pooling,
        "algorithm": learner.name,
        "adapt": learner.scope,
        "adapt_parameters": learner.adapt_names,
        "inner_steps": learner.cfg.inner_steps,
        "inner_lr": learner.cfg.inner_lr,
        "first_order": not learner.second_order,
        **extra,
        **info,
    }
    _write_json(tmp / HEAD_CONFIG, head)
    commit_dir(tmp, folder)
    return folder
