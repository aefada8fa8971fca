"""Folder writes that stop half-way (issue 23): a real process killed mid-write, again and
again, never leaves a half-written folder where a finished one is expected, nor loses the
previous one. Every model folder (adapted, compressed, the exported meta-init, checkpoints)
and the curated data are written through these two functions."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from metaloop.atomic import commit_dir, fresh_tmp

WRITER = """
import sys, os
from pathlib import Path
from metaloop.atomic import commit_dir, fresh_tmp
final = Path(sys.argv[1])
v = int(sys.argv[2])
while True:
    v += 1
    tmp = fresh_tmp(final)
    for i in range(6):  # six files of one version, ~6 MB: a write takes a while
        (tmp / f"part{i}").write_bytes(str(v).encode().ljust(1_000_000, b"."))
    (tmp / "config.json").write_text(str(v))
    commit_dir(tmp, final)
    print(v, flush=True)
"""


def versions_in(folder: Path) -> set[str]:
    return {f.read_bytes()[:12].rstrip(b".").decode() for f in folder.iterdir()}


def test_killed_writers_leave_a_whole_folder_every_time(tmp_path):
    final = tmp_path / "model"
    tmp = fresh_tmp(final)
    for i in range(6):
        (tmp / f"part{i}").write_bytes(b"0".ljust(1_000_000, b"."))
    (tmp / "config.json").write_text("0")
    commit_dir(tmp, final)
    rng = random.Random(0)
    seen = set()
    for attempt in range(15):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(final), str(attempt * 1000)],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # the folder is there, complete, all of one version (the old one or a new one)
        assert final.is_dir(), f"attempt {attempt}: no folder"
        names = sorted(p.name for p in final.iterdir())
        assert names == ["config.json", *(f"part{i}" for i in range(6))], (attempt, names)
        got = versions_in(final)
        assert len(got) == 1, (attempt, got)
        seen |= got
        # the next writer starts clean: leftovers of the killed one are gone
        fresh_tmp(final).rmdir()
        assert [p.name for p in tmp_path.iterdir()] == ["model"], list(tmp_path.iterdir())
    assert len(seen) > 1  # some kills landed after a commit, some before: both were exercised
