"""torch's process-wide state (default RNG, intra-op threads), one block at a time.

    with seeded(13, threads=2):
        model = fit(...)
"""

from __future__ import annotations

import contextlib
import threading

import torch

from metaloop.memory import freed_memory_kept


# torch's default RNG (dropout, head init) and its intra-op thread count belong to the process.
# The flow's threads task runner adapts two domains at once in one process: unguarded, their
# dropout draws interleave and each domain's model depends on the other's timing (two identical
# nightly runs differed by one test row in 66). Blocks that seed or set threads hold this lock,
# so they run one at a time in a process; `flow.task_runner: processes` trains domains in parallel.
TORCH_STATE = threading.RLock()


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run a block with `n` intra-op CPU threads (None: unchanged), alone among such blocks."""
    if not n:
        yield
        return
    with TORCH_STATE:
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(old)


@contextlib.contextmanager
def seeded(seed: int, threads: int | None = None):
    """Run a block alone among seeded blocks of this process, torch's RNG seeded with `seed` and
    `threads` intra-op threads; the caller's RNG state and thread count come back afterwards.
    Every training block runs here, so here freed memory starts being kept for reuse and the
    heap is trimmed when the outermost block ends (`metaloop.memory.freed_memory_kept`)."""
    with TORCH_STATE, torch.random.fork_rng(devices=[]), torch_threads(threads), freed_memory_kept():
        torch.manual_seed(seed)
        yield
