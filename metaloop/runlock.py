"""One retrain at a time per project: a scheduled run and a person's `metaloop run` may overlap.

    with run_lock(Path("."), "flow run 'vague-jaguar'"):
        ...   # curate, episodes, train, adapt, register

The second run exits at once with an error naming the one that holds the lock (its pid,
host, start time and flow run), rather than waiting: a nightly job that queued behind a
stuck run would pile up, and whoever started the second run learns at once what is going
on. Before the lock is taken nothing is written. The lock is an OS file lock (`flock`) on
`.metaloop-run.lock` in the project folder, so it is released when the holder exits, even
when killed; the file's content is only the holder's description.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from metaloop.errors import MetaloopError

LOCK_FILE = ".metaloop-run.lock"


class RunInProgress(MetaloopError):
    """Another retrain holds this project's lock."""


@contextlib.contextmanager
def run_lock(root: Path, what: str) -> Iterator[None]:
    path = Path(root) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            raise RunInProgress(
                f"another metaloop run holds {path.resolve()}: {holder.get('what', 'unknown')}, pid "
                f"{holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}. "
                "Nothing was written; wait for it to finish (or stop it) and run again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"what": what, "pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
