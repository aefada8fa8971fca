"""What a name that comes from data may be, what text counts as empty, and the one place a
path under a root is built.

Domain names from sources end up in file paths, registered model names (`<prefix>-<domain>`),
MLflow tags, Prefect task names and the report, so one rule decides what they may be:

    DOMAIN_RULE  1-64 characters: ASCII letters, digits, `_`, `-`, `.`; starting with a letter
                 or a digit; and a target domain is not `meta` (the init's registered model is
                 `<prefix>-meta`; meta-train and meta-val domains are never registered)

Curation quarantines a row whose domain breaks the rule (reason `bad_domain_name`) rather than
stopping: one bad row of an export must not hold up every other domain; `params.yaml`'s
`domains:` is checked with the same rule and stops with a ConfigError, since it is config.
Label names travel inside model folders and tags only: they must be 1-100 characters with no
control or format characters (`bad_label_name`).

    under(Path("artifacts/adapted"), domain, "int8")   # raises, never escapes its root
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

DOMAIN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RESERVED_DOMAINS = frozenset({"meta"})
DOMAIN_RULE = "1-64 characters: ASCII letters, digits, '_', '-', '.', starting with a letter or digit"
RESERVED_RULE = "'meta' cannot be a target domain: <prefix>-meta is the meta-learned init's registered model"
MAX_LABEL = 100


def domain_problem(name: str, target: bool = False) -> str | None:
    """Why `name` cannot be a domain (a target domain, with `target`), or None when it can."""
    if not DOMAIN_RE.fullmatch(name):
        return f"domain name {name!r} breaks the rule ({DOMAIN_RULE})"
    if target and name.casefold() in RESERVED_DOMAINS:
        return f"domain name {name!r} is reserved ({RESERVED_RULE})"
    return None


def label_problem(name: str) -> str | None:
    if not name or len(name) > MAX_LABEL:
        return f"label name of {len(name)} characters; allowed: 1-{MAX_LABEL}"
    bad = sorted({f"U+{ord(ch):04X}" for ch in name if unicodedata.category(ch) in ("Cc", "Cf")})
    return f"label name {name!r} holds control or format characters {bad}" if bad else None


def _invisible(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Zs")


def is_empty_text(text: str) -> bool:
    """Empty to a reader: nothing but whitespace, control and format (zero-width) characters."""
    return all(_invisible(ch) for ch in text)


def strip_controls(text: str) -> tuple[str, int]:
    """`text` without control characters (tabs and newlines become spaces); and how many went."""
    out, removed = [], 0
    for ch in text:
        if unicodedata.category(ch) == "Cc":
            if ch in "\t\n\r\x0b\x0c":
                out.append(" ")
            else:
                removed += 1
            continue
        out.append(ch)
    return "".join(out), removed


def under(root: Path, *parts: str) -> Path:
    """`root / parts...`, refusing any part that is empty, absolute, `.`/`..` or holds a path
    separator, and any result that resolves outside `root` (symlinks included)."""
    for part in parts:
        if not part or part in (".", "..") or "/" in part or "\\" in part or "\x00" in part:
            raise ValueError(f"{part!r} cannot be a path component under {root} (names from data never "
                             "reach a path unchecked: see metaloop.names)")
    path = Path(root).joinpath(*parts)
    base = Path(root).resolve()
    if not path.resolve().is_relative_to(base):
        raise ValueError(f"{path} resolves outside {root}")
    return path
