"""`keep_freed_memory`: a training process stops page-faulting its activations in every step."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SIZES = [7_000_000, 6_000_000, 5_000_000, 4_000_000]  # float32: 28, 24, 20, 16 MB, under glibc's 32 MB cap
ROUNDS = 10

PROBE = textwrap.dedent(f"""
    import resource, sys, torch
    from metaloop.meta.dist import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory(), "mallopt refused a setting"
    xs = [torch.ones(s) for s in {SIZES}]  # one step's activations, once, to warm the heap
    del xs
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range({ROUNDS}):
        xs = [torch.ones(s) for s in {SIZES}]
        del xs
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    pages = ROUNDS * sum(SIZES) * 4 // 4096  # ~225k pages allocated and freed again
    kept = _page_faults("keep")
    # glibc's defaults fault in 25k-153k of them (its adaptive thresholds vary from run to run);
    # kept, the blocks come back from the heap: ~4k faults, Python's own small objects
    assert kept < pages / 20, (kept, pages, _page_faults("default"))
