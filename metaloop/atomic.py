"""All-or-nothing folder writes: build in a temporary sibling, then rename into place.

A reader (or a crash) never sees a half-written model, checkpoint or dataset folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def fresh_tmp(final: Path) -> Path:
    """An empty temporary folder beside `final` (same filesystem, so the rename is atomic).
    Leftovers of a writer that was killed (`.tmp-`/`.stale-` siblings) are removed first; one
    run at a time writes a project's folders (metaloop/runlock.py), so none is in use."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for left in [*final.parent.glob(f".tmp-{final.name}-*"), *final.parent.glob(f".stale-{final.name}-*")]:
        if left.is_dir() and not final.exists() and left.name.startswith(".stale-"):
            os.replace(left, final)  # killed between the two renames of the fallback below
        else:
            shutil.rmtree(left, ignore_errors=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary folder into place, replacing an older one. On Linux the two
    folders are swapped in one atomic step (renameat2 RENAME_EXCHANGE): at every instant
    `final` is either the old folder or the new one, complete, even if the process is killed."""
    if not final.exists():
        os.replace(tmp, final)
        return
    if _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        return
    stale = final.with_name(f".stale-{final.name}-{os.getpid()}")
    os.replace(final, stale)  # a kill right here is undone by the next fresh_tmp
    os.replace(tmp, final)
    shutil.rmtree(stale, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux >= 3.15); False where the system cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    return False


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
