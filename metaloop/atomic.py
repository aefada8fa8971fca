"""All-or-nothing folder writes: build in a temporary sibling, then rename into place.

A reader (or a crash) never sees a half-written model, checkpoint or dataset folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def fresh_tmp(final: Path) -> Path:
    """An empty temporary folder beside `final` (same filesystem, so the rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary folder into place, replacing an older one."""
    if final.exists():
        stale = final.with_name(f".stale-{final.name}-{os.getpid()}")
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
