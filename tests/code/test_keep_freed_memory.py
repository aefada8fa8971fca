"""`metaloop.memory`: a training process, or one training block of a long-lived process, stops
page-faulting its activations in every step; a block gives the memory back when it ends."""

from __future__ import annotations

import statistics
import subprocess
import sys
import textwrap

import pytest

SIZES = [7_000_000, 6_000_000, 5_000_000, 4_000_000]  # float32: 28, 24, 20, 16 MB, under glibc's 32 MB cap
ROUNDS = 15
PAGES = sum(SIZES) * 4 // 4096  # pages one round allocates and frees again (~21k)

PROBE = textwrap.dedent(f"""
    import resource, sys, torch
    from metaloop.memory import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory(), "mallopt refused a setting"
    out = []
    for _ in range({ROUNDS}):  # one step's activations a round
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        xs = [torch.ones(s) for s in {SIZES}]
        del xs
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(*out)
""")


def _page_faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return [int(v) for v in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    kept = _page_faults("keep")
    # Kept, the blocks come back from the heap once its layout settles (rounds 5-10 here): the
    # last rounds fault ~0 pages. glibc's defaults fault in 0-100% of each round's pages, varying
    # from run to run with its adaptive thresholds.
    assert statistics.median(kept[-5:]) < PAGES / 20, (kept, PAGES, _page_faults("default"))


BLOCK = textwrap.dedent(f"""
    import os, sys, torch
    from metaloop.memory import freed_memory_kept, keep_freed_memory
    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    def step():
        xs = [torch.ones(s) for s in {SIZES}]
        del xs
    if sys.argv[1] == "process":
        keep_freed_memory()
    base = rss_mb()
    with freed_memory_kept() as ok:
        with freed_memory_kept():  # seeded blocks nest: only the outermost one trims
            step()
        held = rss_mb() - base
        assert ok
    after = rss_mb() - base
    step()
    print(held, after, rss_mb() - base)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
@pytest.mark.parametrize("mode", ["block", "process"])
def test_a_block_keeps_freed_memory_and_gives_it_back_when_it_ends(mode):
    out = subprocess.run([sys.executable, "-c", BLOCK, mode], capture_output=True, text=True, check=True)
    held, after, after_step = (float(v) for v in out.stdout.split())
    assert held > 60, held  # a step's 88 MB stays in the heap for the next step, past the inner block's end
    if mode == "block":  # handed back to the kernel when the outermost block ends...
        assert after < 20, after
    else:  # ...unless the whole process keeps freed memory: then a block's end changes nothing
        assert after > 60, after
    assert after_step > 60, after_step  # the settings stay for later work (evaluation) either way
