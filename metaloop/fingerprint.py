"""What each registered model is built from: one fingerprint per model, not one per run.

A model is stale when its fingerprint differs from the one recorded on its champion (or on
the challenger that lost to it); only stale models are retrained. Two kinds of model:

| model | parts of its fingerprint |
|---|---|
| the meta-learned init (`<prefix>-meta`) | rows of the meta-train and meta-val domains; the meta-train / meta-val episode files; params `seed`, `backbone`, `meta`, `episodes` (not the evaluation draws), `domains.meta_train`, `domains.meta_val`; code |
| a target domain (`<prefix>-<domain>`) | the domain's own rows; its evaluation episodes (eval hash); the init version it adapts from; params `seed`, `backbone`, `adapt`, `compress`, `registry`, `promotion`; code |

So an edited row in one target domain, or a new target domain, retrains that domain alone;
changed meta-train rows or meta params retrain the init, and through the new init version,
every domain. Output folders are left out: moving one changes no model.

`code` hashes the sources of `metaloop/`, `tasks/` and `flows/` (docs/decisions.md 8): a
conservative choice, any code change retrains every model.

    fp = domain_fingerprint(params, manifest, "hospitality", init_version="3", code="ab12")
    fp.digest                   # what the version's `metaloop.fingerprint` tag holds
    fp.changes(recorded_tags)   # ["rows changed", "init v2 -> v3"]: why it is stale
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

from metaloop.config import Params

TAG = "metaloop."  # the prefix of every tag metaloop writes (tasks.tracking uses the same)

# Which params sections shape which model: the invalidation table above, in code.
META_PARAMS = ("seed", "backbone", "meta", "episodes", "domains.meta_train", "domains.meta_val")
DOMAIN_PARAMS = ("seed", "backbone", "adapt", "compress", "registry", "promotion")
# Inside those sections, keys that shape no model: where files go, and the evaluation draws
# (those reach a domain's fingerprint through its eval hash, and never touch the init).
IGNORED_KEYS = ("output_dir", "episodes.eval_shots", "episodes.eval_draws")

# What each part is called in the reasons a model is retrained.
_CHANGED = {"rows": "rows changed", "episodes": "meta-train episodes changed", "eval": "evaluation episodes changed",
            "params": "params changed", "code": "code changed"}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _pick(tree: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def _drop_ignored(section: str, value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    out = {}
    for key, sub in value.items():
        dotted = f"{section}.{key}"
        if key == "output_dir" or dotted in IGNORED_KEYS:
            continue
        out[key] = _drop_ignored(dotted, sub)
    return out


def params_hash(params: Params, sections: tuple[str, ...]) -> str:
    """Hash of the params sections that shape one kind of model (nothing else)."""
    tree = params.model_dump(mode="json")
    return _digest({s: _drop_ignored(s, _pick(tree, s)) for s in sections})


@dataclass(frozen=True)
class Fingerprint:
    """The named parts a model is built from; `digest` is one hash over all of them."""

    parts: Mapping[str, str]

    @property
    def digest(self) -> str:
        return _digest(dict(self.parts))

    def tags(self) -> dict[str, str]:
        """As recorded on a model version: the digest and each part (`metaloop.fp.<part>`)."""
        return {TAG + "fingerprint": self.digest, **{f"{TAG}fp.{k}": v for k, v in self.parts.items()}}

    def matches(self, tags: Mapping[str, str]) -> bool:
        return tags.get(TAG + "fingerprint") == self.digest

    def changes(self, tags: Mapping[str, str]) -> list[str]:
        """Why a version with these tags is not this model: one short reason per changed part."""
        if TAG + "fingerprint" not in tags:
            return ["no fingerprint recorded (built by an older metaloop)"]
        out = []
        for part, value in self.parts.items():
            was = tags.get(f"{TAG}fp.{part}")
            if was == value:
                continue
            out.append(f"init v{was} -> v{value}" if part == "init" else _CHANGED.get(part, f"{part} changed"))
        return out or ["fingerprint changed"]


def rows_hash(manifest: Mapping, domains: list[str]) -> str:
    by_domain = manifest.get("rows_hash_by_domain", {})
    return _digest({d: by_domain.get(d, "missing") for d in sorted(domains)})


def meta_fingerprint(params: Params, manifest: Mapping, code: str) -> Fingerprint:
    """The meta-learned init's fingerprint; `manifest` is the episodes stage's manifest.json."""
    d = params.domains
    files = manifest.get("files", {})
    return Fingerprint({
        "rows": rows_hash(manifest, [*d.meta_train, *d.meta_val]),
        "episodes": _digest({k: files.get(k, "missing") for k in ("meta_train.jsonl", "meta_val.jsonl")}),
        "params": params_hash(params, META_PARAMS),
        "code": code,
    })


def domain_fingerprint(params: Params, manifest: Mapping, domain: str, init_version: str, code: str) -> Fingerprint:
    """A target domain's model fingerprint, adapting from meta-init version `init_version`."""
    return Fingerprint({
        "rows": rows_hash(manifest, [domain]),
        "eval": manifest.get("eval_hash_by_domain", {}).get(domain, "missing"),
        "init": str(init_version),
        "params": params_hash(params, DOMAIN_PARAMS),
        "code": code,
    })
