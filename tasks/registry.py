"""Model registry: register versions with lineage tags, promote by policy, roll back.

Registered models: `<prefix>-meta` (the meta-learned initialisation) and `<prefix>-<domain>`.
A new version gets alias `challenger`; `champion` moves only after every check passed, as
the very last write, so a crash anywhere before leaves the previous champion in place.
Decisions and reasons are written to the version's tags; re-running is a no-op.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from metaloop.errors import MetaloopError
from metaloop.promotion import Check, Decision, Scored, decide
from tasks.tracking import TAG

CHAMPION, CHALLENGER = "champion", "challenger"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


class ArtifactUploadFailed(OSError):
    """The artifact store behind MLflow (S3) refused or dropped an upload; nothing was registered."""


def upload_artifacts(c: MlflowClient, run_id: str, local_dir: str, artifact_path: str) -> None:
    """`log_artifacts`, with a message that says what failed and what state the registry is in."""
    try:
        c.log_artifacts(run_id, local_dir, artifact_path)
    except Exception as err:
        raise ArtifactUploadFailed(
            f"could not upload {artifact_path!r} of MLflow run {run_id} to the artifact store behind "
            f"{c.tracking_uri} (for a server: its --artifacts-destination, e.g. S3); no model version was "
            f"created and no alias moved, rerun when the store is back. Cause: {type(err).__name__}: {err}"
        ) from err


def model_name(prefix: str, domain: str) -> str:
    return f"{prefix}-{domain}"


# What each kind of classifier folder needs at serving time (the pyfunc's own imports aside).
ONNX_RUNTIME = ("onnxruntime", "tokenizers", "numpy", "pandas")
TORCH_RUNTIME = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas", "pydantic")


def serving_requirements(classifier_dir: Path) -> list[str]:
    """The folder's serving packages, pinned to this (the training) environment's versions:
    torch unpinned would pull the CUDA build on most hosts; ONNX folders need no torch."""
    from importlib.metadata import version

    from metaloop.onnx_runtime import is_onnx_folder

    return [f"{p}=={version(p)}" for p in (ONNX_RUNTIME if is_onnx_folder(classifier_dir) else TORCH_RUNTIME)]


def _runtime_code(classifier_dir: Path, dst: Path) -> Path:
    """The `metaloop` package as the model carries it (MLflow code_paths): for ONNX only the
    torch-free serving modules; otherwise the library without its corpus data."""
    import shutil

    import metaloop
    from metaloop.onnx_runtime import is_onnx_folder

    src = Path(metaloop.__file__).parent
    pkg = dst / "metaloop"
    if is_onnx_folder(classifier_dir):
        pkg.mkdir(parents=True)
        for name in ("__init__.py", "serving.py", "onnx_runtime.py"):
            shutil.copy(src / name, pkg / name)
    else:
        shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("__pycache__", "corpus"))
    return pkg


def log_classifier(c: MlflowClient, run_id: str, classifier_dir: Path, artifact_path: str = "model") -> str:
    """Log a classifier folder as a self-contained models-from-code pyfunc; return its URI."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(inputs=Schema([ColSpec("string")]),
                               outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]),
                               params=ParamSchema([ParamSpec("top_k", "long", 1)]))
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / artifact_path
        mlflow.pyfunc.save_model(
            path=str(local), python_model=str(PYFUNC_CODE), artifacts={"classifier": str(classifier_dir)},
            code_paths=[str(_runtime_code(classifier_dir, Path(tmp) / "code"))],
            signature=signature, pip_requirements=serving_requirements(classifier_dir),
            input_example=pd.DataFrame({"text": [_example_text(classifier_dir)]}),
        )
        upload_artifacts(c, run_id, str(local), artifact_path)
    return f"runs:/{run_id}/{artifact_path}"


def _example_text(classifier_dir: Path) -> str:
    """The request the registry shows as the model's input example (and its REST serving
    example): the first class's name as words, from the folder's own labels, so no row of
    the domain's data ends up in the registry."""
    from transformers import AutoConfig

    from metaloop.meta.head import label_text

    return label_text(AutoConfig.from_pretrained(classifier_dir).id2label[0])  # as metaloop.serving reads labels


# Tags that claim a finished evaluation: written only once the version exists, and removed
# from a version whose registration did not finish (`clean_abandoned`).
CLAIMS = ("metrics", "correct", "fingerprint")
STATE = TAG + "state"  # registering -> registered, or abandoned


def register_version(c: MlflowClient, name: str, source: str, run_id: str, tags: Mapping[str, str],
                     description: str = "", claims: Mapping[str, str] | None = None,
                     after_create: Callable[[], None] | None = None) -> str:
    """Create a version of `name` (and the model if new) with its lineage `tags`, then its
    `claims` (metrics, per-query record, fingerprint), then alias it `challenger`; return the
    version. A crash in between leaves a version in state `registering` without the alias,
    which nothing reads and the next registration marks abandoned."""
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description=description or None)
    clean_abandoned(c, name)
    mv = c.create_model_version(name, source=source, run_id=run_id,
                                tags={**{k: str(v) for k, v in tags.items()}, STATE: "registering"})
    version = str(mv.version)
    try:
        if after_create:
            after_create()  # fault drills (tasks/stages.py) stop here
        for key, value in (claims or {}).items():
            c.set_model_version_tag(name, version, key, str(value))
        c.set_registered_model_alias(name, CHALLENGER, version)
        c.set_model_version_tag(name, version, STATE, "registered")
    except BaseException as err:
        _abandon(c, name, version, f"{type(err).__name__}: {err}")
        raise
    return version


def _abandon(c: MlflowClient, name: str, version: str, why: str) -> None:
    """Best effort: take back the alias and the claims of a version whose registration failed."""
    try:
        if _alias(c, name, CHALLENGER) == version:
            c.delete_registered_model_alias(name, CHALLENGER)
        tags = c.get_model_version(name, version).tags
        for key in CLAIMS:
            if TAG + key in tags:
                c.delete_model_version_tag(name, version, TAG + key)
        c.set_model_version_tag(name, version, STATE, f"abandoned: {why}"[:500])
    except Exception:  # the registry itself may be what failed; clean_abandoned retries later
        pass


def clean_abandoned(c: MlflowClient, name: str) -> list[str]:
    """Versions left `registering` by a process that died (no alias): abandon them."""
    aliased = {_alias(c, name, CHAMPION), _alias(c, name, CHALLENGER)}
    out = []
    for mv in c.search_model_versions(f"name = '{name}'"):
        if mv.tags.get(STATE) == "registering" and str(mv.version) not in aliased:
            _abandon(c, name, str(mv.version), "its registration never finished (process ended)")
            out.append(str(mv.version))
    return out


def _alias(c: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _scores_key(eval_hash: str) -> str:
    return TAG + "scores." + eval_hash[:16]


def _scored(c: MlflowClient, name: str, version: str, eval_hash: str | None = None) -> Scored:
    """The version's scores; on `eval_hash` from a re-scoring (`record_scores`) where its own
    evaluation was on other episodes or kept no per-query record."""
    tags = c.get_model_version(name, version).tags
    own = Scored(version, tags.get(TAG + "eval_hash", ""), json.loads(tags.get(TAG + "metrics", "{}")),
                 tags.get(TAG + "correct"))
    if eval_hash and (own.eval_hash != eval_hash or not own.correct) and _scores_key(eval_hash) in tags:
        again = json.loads(tags[_scores_key(eval_hash)])
        return Scored(version, again["eval_hash"], again["metrics"], again["correct"])
    return own


def champion_to_rescore(c: MlflowClient, name: str, eval_hash: str) -> str | None:
    """The champion's version if it has no scores with a per-query record on `eval_hash`
    (its domain's data changed since, or it predates the records); else None."""
    champion = _alias(c, name, CHAMPION)  # None also when the model is not registered yet
    if champion is None:
        return None
    s = _scored(c, name, champion, eval_hash)
    return champion if s.eval_hash != eval_hash or not s.correct else None


def download_classifier(c: MlflowClient, name: str, version: str, dst: Path) -> Path:
    """The classifier folder inside a registered pyfunc version (what `log_classifier` wrapped)."""
    import mlflow.artifacts

    source = c.get_model_version(name, version).source
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/artifacts", dst_path=str(dst),
                                                      tracking_uri=c.tracking_uri))
    folders = [p for p in local.iterdir() if p.is_dir()]
    if len(folders) != 1:
        raise MetaloopError(f"{name} v{version}: expected one classifier folder under {source}/artifacts, "
                            f"found {[p.name for p in folders]}")
    return folders[0]


def download_init(c: MlflowClient, name: str, version: str, cache: Path) -> Path:
    """The meta-learned init of `name` v`version` as a local AutoModel folder, downloaded once
    into `cache`/v<version>-<run id> (atomically: a half-finished download is never used)."""
    import shutil

    import mlflow.artifacts

    mv = c.get_model_version(name, version)
    dst = cache / f"v{version}-{mv.run_id[:12]}"
    if (dst / "config.json").is_file():
        return dst
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=tmp,
                                                          tracking_uri=c.tracking_uri))
        if not (local / "config.json").is_file():
            raise MetaloopError(f"{name} v{version}: {mv.source} holds no model folder (config.json); "
                                "retrain the init with `metaloop run --force`")
        shutil.rmtree(dst, ignore_errors=True)
        local.rename(dst)
    return dst


def resolve(c: MlflowClient, prefix: str, domain: str, alias: str = CHAMPION, version: str | None = None) -> str:
    """The version `metaloop predict` scores with; an unknown domain or a missing alias is
    one line naming the domains that have a champion."""
    name = model_name(prefix, domain)
    found = version if version else _alias(c, name, alias)
    if found and version:
        try:
            c.get_model_version(name, version)
        except MlflowException:
            found = None
    if found:
        return str(found)
    served = [r.domain for r in list_models(c, prefix) if r.champion]
    what = f"version {version}" if version else f"no {alias!r} alias"
    raise MetaloopError(f"{name}: {what} in the registry at {c.tracking_uri}; domains with a champion: "
                        f"{', '.join(served) or 'none (run `metaloop run` first)'}")


def rounded(metrics: Mapping[str, float]) -> dict[str, float]:
    """Metrics as the `metrics` tags hold them (a version's own and a re-scoring's alike)."""
    return {k: round(v, 4) for k, v in metrics.items()}


def record_scores(c: MlflowClient, name: str, version: str, eval_hash: str, metrics: Mapping[str, float],
                  correct: str | None) -> None:
    """Write a re-scoring on other evaluation episodes beside the version's own scores."""
    body = {"eval_hash": eval_hash, "metrics": rounded(metrics), "correct": correct}
    c.set_model_version_tag(name, version, _scores_key(eval_hash), json.dumps(body))


def promote(c: MlflowClient, name: str, version: str, policy: Check,
            before_alias_move: Callable[[], None] | None = None) -> Decision:
    """Decide whether `version` replaces the champion; write the decision; move aliases last."""
    champion = _alias(c, name, CHAMPION)
    tags = c.get_model_version(name, version).tags
    if champion == version:
        if _alias(c, name, CHALLENGER) == version:  # a move interrupted after `champion` moved: finish it
            c.delete_registered_model_alias(name, CHALLENGER)
        return Decision(True, ("already champion",), version, champion)
    if TAG + "decision" in tags and tags[TAG + "decided_against"] == str(champion):
        # Decided before against this same champion: replay it (and finish an interrupted move).
        decision = Decision(tags[TAG + "decision"] == "promote", tuple(json.loads(tags[TAG + "reasons"])), version, champion)
    else:
        cand = _scored(c, name, version)
        decision = decide(cand, _scored(c, name, champion, cand.eval_hash) if champion else None, policy)
        for key, value in {
            "decision": "promote" if decision.promote else "keep",
            "reasons": json.dumps(list(decision.reasons)),
            "decided_against": str(champion),
            "decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }.items():
            c.set_model_version_tag(name, version, TAG + key, value)
    if not decision.promote:
        return decision
    if before_alias_move:
        before_alias_move()  # tests inject a crash here
    if champion:
        c.set_model_version_tag(name, version, TAG + "previous_champion", champion)
    c.set_registered_model_alias(name, CHAMPION, version)
    if _alias(c, name, CHALLENGER) == version:
        c.delete_registered_model_alias(name, CHALLENGER)
    return decision


def rollback(c: MlflowClient, name: str) -> str:
    """Move `champion` back to the version it replaced; record both ends. Returns that version."""
    current = _alias(c, name, CHAMPION)
    if current is None:
        raise MetaloopError(f"{name}: has no champion to roll back")
    previous = c.get_model_version(name, current).tags.get(TAG + "previous_champion")
    if not previous:
        raise MetaloopError(f"{name}: champion v{current} replaced no earlier champion; nothing to roll back to")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    c.set_model_version_tag(name, current, TAG + "rolled_back_at", stamp)
    c.set_model_version_tag(name, previous, TAG + "restored_from", current)
    c.set_registered_model_alias(name, CHAMPION, previous)
    return previous


@dataclass
class ModelRow:
    domain: str
    registered_model: str
    champion: str | None
    challenger: str | None
    tags: dict[str, str]


def list_models(c: MlflowClient, prefix: str) -> list[ModelRow]:
    rows = []
    for rm in c.search_registered_models(filter_string=f"name LIKE '{prefix}-%'"):
        champion, challenger = _alias(c, rm.name, CHAMPION), _alias(c, rm.name, CHALLENGER)
        tags = c.get_model_version(rm.name, champion).tags if champion else {}
        rows.append(ModelRow(rm.name.removeprefix(prefix + "-"), rm.name, champion, challenger, dict(tags)))
    return sorted(rows, key=lambda r: r.domain)


def as_json(rows: list[ModelRow]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)
