"""glibc malloc settings for training: keep freed memory for reuse instead of page-faulting it in.

glibc malloc hands blocks over 128 KB back to the kernel on free, so every step's activations
come back as fresh pages: page faults, and the kernel zeroing pages. On the 2-core reference
machine that made a second-order MAML step 26% slower (12.3 s against 16.6 s), cost two
ranks ~5% of their compute against one (memory bandwidth they share), and made a domain's
fine-tuning in the flow 15% slower (64.7 s against 56.2 s). PyTorch's CPU tuning guide
swaps in jemalloc/tcmalloc for this; three mallopt settings do it with the glibc we have.

* `keep_freed_memory()`: for a whole process that only trains (torchrun ranks, benchmarks).
* `freed_memory_kept()`: for the training blocks of a process that does other work too (the
  flow's adaptation and compression, `metaloop.adapt.seeded`): the settings apply from the
  first block on, and when the outermost block ends `malloc_trim` hands the heap's free pages
  to the kernel, so the process does not sit on its training peak. The settings stay: glibc
  cannot be put back to its adaptive defaults (mallopt switches them off for good), and fixed
  128 KB thresholds would page-fault every later evaluation's buffers in afresh.

Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import threading
from collections.abc import Iterator

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEEP = {_M_MMAP_THRESHOLD: 32 << 20,      # blocks up to 32 MB (glibc's cap) come from the heap...
         _M_TRIM_THRESHOLD: (1 << 31) - 1,  # ...which is not handed back on free...
         _M_TOP_PAD: 256 << 20}             # ...and grows 256 MB at a time

_lock = threading.Lock()
_applied = False  # the settings are in force (they stay for the rest of the process)
_process_wide = False  # keep_freed_memory() was called: blocks do not trim
_depth = 0  # freed_memory_kept() blocks open (nested or in several threads)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None  # glibc only


def _apply(libc) -> bool:
    """Put the settings in force once (call with `_lock` held)."""
    global _applied
    if not _applied:
        _applied = all(libc.mallopt(ctypes.c_int(k), ctypes.c_int(v)) == 1 for k, v in _KEEP.items())
    return _applied


def keep_freed_memory() -> bool:
    """Keep freed memory for reuse for the rest of this process. False where not glibc."""
    global _process_wide
    libc = _libc()
    if libc is None:
        return False
    with _lock:
        _process_wide = True
        return _apply(libc)


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """Keep freed memory for reuse from this block on (yields whether it could); when the
    outermost block ends, trim the heap unless the whole process keeps freed memory."""
    global _depth
    libc = _libc()
    if libc is None:
        yield False
        return
    with _lock:
        _depth += 1
        ok = _apply(libc)
    try:
        yield ok
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and not _process_wide:
                libc.malloc_trim(ctypes.c_size_t(0))
