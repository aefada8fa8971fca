"""What a run retrains: each model's fingerprint against what the registry recorded.

    plan = make_plan(params, manifest)            # manifest: the episodes stage's manifest.json
    plan.meta.retrain, plan.meta.why              # True, "meta-train episodes changed"
    [(d.name, d.retrain, d.why) for d in plan.domains]
    plan.removed                                  # registered domains no longer in domains.target

A model is up to date when its champion, or the challenger that lost to it, carries the
fingerprint the current data, params and code give it (`metaloop.fingerprint`). A domain's
fingerprint names the init version it adapts from, so a retrained init makes every domain
stale, and nothing else does.

Plain functions, light on imports (MLflow, DVC as a subprocess; no torch, no Prefect), so
that `metaloop run` can answer "nothing changed" before it starts Prefect's API. The flow
wraps the same functions as a task, so a scheduled run decides the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import metaloop
import tasks as tasks_pkg
from metaloop.config import Params
from metaloop.episode_sets import MANIFEST
from metaloop.fingerprint import Fingerprint, domain_fingerprint, meta_fingerprint
from tasks import registry, tracking

META = "meta"  # the init's registered model is <prefix>-meta


def code_version() -> str:
    """Hash of the library, tasks and flows sources: what decides whether code changed."""
    h = hashlib.sha256()
    project = Path(tasks_pkg.__file__).parent.parent
    for root in (Path(metaloop.__file__).parent, Path(tasks_pkg.__file__).parent, project / "flows"):
        for f in sorted(root.rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class ModelPlan:
    """One model's decision. `version`: the registered version that stays (skipped models),
    or, for the init, the version the domains adapt from."""

    name: str
    retrain: bool
    why: str
    fingerprint: Fingerprint | None = None  # None for a domain until its init version is known
    version: str | None = None
    champion: str | None = None
    promotion_pending: bool = False  # registered (this fingerprint) but never decided on


@dataclass
class Plan:
    meta: ModelPlan
    domains: list[ModelPlan]
    removed: list[str] = field(default_factory=list)

    @property
    def nothing_to_do(self) -> bool:
        return not self.meta.retrain and not any(d.retrain or d.promotion_pending for d in self.domains)

    def stale_domains(self) -> list[str]:
        return [d.name for d in self.domains if d.retrain]

    def lines(self) -> list[str]:
        rows = [self.meta, *self.domains]
        return [f"{m.name}: {'retrain' if m.retrain else 'skip'} ({m.why})" for m in rows] + \
               [f"{d}: removed from domains.target; its models stay in the registry, no longer retrained"
                for d in self.removed]


def _aliased(c, name: str) -> tuple[str | None, list[tuple[str, dict]]]:
    """The champion, and (version, tags) of the champion and the challenger, champion first."""
    champion = registry._alias(c, name, registry.CHAMPION)
    out = []
    for v in (champion, registry._alias(c, name, registry.CHALLENGER)):
        if v and v not in (x for x, _ in out):
            out.append((v, c.get_model_version(name, v).tags))
    return champion, out


def _decide(c, name: str, fp: Fingerprint, forced: str | None) -> ModelPlan:
    """One registered model's decision (`name` is filled in by the caller)."""
    champion, versions = _aliased(c, name)
    matching = [v for v, tags in versions if fp.matches(tags)]
    if forced:
        return ModelPlan(name, True, forced, fp, champion=champion)
    if matching:
        v = max(matching, key=int)  # after a forced retrain both may match: the newest was used last
        undecided = champion != v and "metaloop.decision" not in dict(versions)[v]
        lost = champion is not None and champion != v and not undecided
        why = f"unchanged since v{v}" + (" (lost to the champion)" if lost else "") + \
              ("; its promotion never ran" if undecided else "")
        return ModelPlan(name, False, why, fp, v, champion, promotion_pending=undecided)
    if not versions:
        return ModelPlan(name, True, "new: no version registered", fp)
    return ModelPlan(name, True, ", ".join(fp.changes(versions[0][1])), fp, champion=champion)


def make_plan(params: Params, manifest: dict, c=None, force: bool = False, only: list[str] | None = None) -> Plan:
    """Decide per model. `force`: everything; `only`: these target domains, forced, and no
    other (the init still retrains if it is stale, since they must adapt from current data)."""
    c = c or tracking.client()
    code = code_version()
    prefix = params.registry.prefix
    targets = sorted(params.domains.target)
    unknown = sorted(set(only or []) - set(targets))
    if unknown:
        from metaloop.errors import ConfigError

        raise ConfigError(f"--domain {', '.join(unknown)}: not in domains.target ({', '.join(targets)}); "
                          "name a target domain from params.yaml")
    meta = _decide(c, registry.model_name(prefix, META), meta_fingerprint(params, manifest, code),
                   "--force" if force else None)
    meta.name = META
    domains = []
    for d in targets:
        name = registry.model_name(prefix, d)
        if only and d not in only:
            domains.append(ModelPlan(d, False, "not selected (--domain)", champion=registry._alias(c, name, registry.CHAMPION)))
            continue
        if meta.retrain:
            champion, versions = _aliased(c, name)
            why = "--force" if force else ("new init" if versions else "new: no version registered")
            domains.append(ModelPlan(d, True, why, champion=champion))
            continue
        fp = domain_fingerprint(params, manifest, d, meta.version, code)
        m = _decide(c, name, fp, "--force" if force else ("--domain" if only else None))
        m.name = d
        domains.append(m)
    registered = {row.domain for row in registry.list_models(c, prefix)}
    removed = sorted(registered - set(targets) - {META})
    return Plan(meta, domains, removed)


def read_manifest(params: Params, root: Path = Path(".")) -> dict:
    return json.loads((root / params.episodes.output_dir / MANIFEST).read_text())


def data_up_to_date(root: Path = Path(".")) -> bool:
    """`dvc status`: True when no stage would run (deps, params and outputs as in dvc.lock)."""
    proc = tracking.dvc("status", "--json", cwd=root)
    try:
        return proc.returncode == 0 and json.loads(proc.stdout or "null") == {}
    except json.JSONDecodeError:
        return False


def nothing_changed(params: Params, root: Path = Path(".")) -> Plan | None:
    """The plan when no model is stale; None when one is or it cannot be told without running
    the pipeline (a DVC stage out of date: then the flow decides)."""
    if not data_up_to_date(root):
        return None
    try:
        plan = make_plan(params, read_manifest(params, root))
    except FileNotFoundError:
        return None
    return plan if plan.nothing_to_do else None
