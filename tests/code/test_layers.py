"""The layers hold: `lint-imports` keeps every contract in .importlinter, and the contracts
catch an upward import, a server import in the library and a cycle when one is added."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from support import BIN, ROOT


def lint(root, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lint-imports"), "--config", str(root / ".importlinter"), "--no-cache", *extra],
                          cwd=root, capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": str(BIN)},
                          timeout=300)


def test_the_tree_keeps_every_contract():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("tasks/plan.py", "import flows.retrain", "never upwards"),
    ("metaloop/evaluate.py", "import mlflow", "no Prefect and no MLflow"),
    ("metaloop/compress/runtime.py", "import metaloop.compress.quantize", "no import cycles"),
])
def test_a_broken_layer_is_caught(tmp_path, module, line, contract):
    for package in ("metaloop", "tasks", "flows"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("*.jsonl", "__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    target = tmp_path / module
    target.write_text(target.read_text(encoding="utf-8") + f"\n{line}  # added by the test\n", encoding="utf-8")
    proc = lint(tmp_path)
    assert proc.returncode != 0, proc.stdout[-3000:]
    broken = proc.stdout.split("Broken contracts")[-1]
    assert contract in broken, proc.stdout[-3000:]
