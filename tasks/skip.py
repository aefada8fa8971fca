"""Skip when nothing changed: the fingerprint and its comparison with the registry.

Plain functions, light on imports (MLflow, DVC as a subprocess; no torch, no Prefect), so
that `metaloop run` can answer "nothing changed" before it starts Prefect's API. The flow
wraps the same functions as tasks, so a scheduled run decides the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import flows as flows_pkg
import metaloop
import tasks as tasks_pkg
from metaloop.config import Params
from tasks import registry, tracking
from tasks.tracking import TAG

FINGERPRINT_KEYS = ("data_hash", "params_hash", "code_version")


def code_version() -> str:
    """Hash of the library, tasks and flows sources: what decides whether code changed."""
    h = hashlib.sha256()
    for pkg in (metaloop, tasks_pkg, flows_pkg):
        root = Path(pkg.__file__).parent
        for f in sorted(root.rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:16]


def fingerprint(params: Params, data_hash: str) -> dict[str, str]:
    return {"data_hash": data_hash, "params_hash": tracking.params_hash(params), "code_version": code_version()}


def model_names(params: Params) -> list[str]:
    return [registry.model_name(params.registry.prefix, d) for d in ["meta", *sorted(params.domains.target)]]


def unchanged(params: Params, fp: dict[str, str]) -> bool:
    """True when every model's champion (or the challenger that lost to it) has this fingerprint."""
    c = tracking.client()
    for name in model_names(params):
        versions = [v for v in (registry._alias(c, name, registry.CHAMPION), registry._alias(c, name, registry.CHALLENGER)) if v]
        if not any(all(c.get_model_version(name, v).tags.get(TAG + k) == fp[k] for k in FINGERPRINT_KEYS) for v in versions):
            return False
    return True


def data_up_to_date(root: Path = Path(".")) -> bool:
    """`dvc status`: True when no stage would run (deps, params and outputs as in dvc.lock)."""
    proc = tracking.dvc("status", "--json", cwd=root)
    try:
        return proc.returncode == 0 and json.loads(proc.stdout or "null") == {}
    except json.JSONDecodeError:
        return False


def nothing_changed(params: Params, root: Path = Path(".")) -> dict[str, str] | None:
    """The fingerprint when data, params and code equal the champions'; None when anything
    differs or cannot be told without running the pipeline (then the flow decides)."""
    if not data_up_to_date(root):
        return None
    fp = fingerprint(params, tracking.dvc_data_hash(root / "dvc.lock"))
    return fp if unchanged(params, fp) else None
