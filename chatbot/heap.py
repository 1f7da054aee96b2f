"""Keep a long-running process's memory flat: torch's CPU kernels cache and glibc's malloc
keep memory that nothing uses any more.

Two things made the server's memory climb pair after pair (pairs of 48 tokens on the
embedded model in bfloat16: 770 MB after 10 pairs, 1019 MB after 100, Python's objects flat):

* oneDNN, which runs torch's bfloat16 matrix products on a CPU, caches a compiled kernel per
  shape, up to 1024 of them; every prompt length is a new shape. `cap_kernel_cache` caps it
  at 8 (a decode step uses five shapes, all cached; a prompt's compiles once) unless
  ONEDNN_PRIMITIVE_CACHE_CAPACITY is already set. It must run before torch's first oneDNN
  call, and child processes inherit it.
* glibc keeps freed tensors' memory in its arenas for later use, and tensors of other sizes
  fit it badly. `release` (malloc_trim) hands the free pages back, after each pair and after
  each learner round.

With both, 70 pairs stayed within 643-688 MB; trimming alone went from 693 MB after 10 pairs
to 819 MB after 100. Elsewhere than glibc (musl, macOS) `release` does nothing.

Left out: swapping the allocator (jemalloc or tcmalloc by LD_PRELOAD; needs nothing here).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

log = logging.getLogger(__name__)

KERNEL_CACHE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
KERNEL_CACHE_SIZE = 8


def cap_kernel_cache(size: int = KERNEL_CACHE_SIZE) -> int:
    """Cap oneDNN's kernel cache for this process and its children, unless the environment
    already does; returns the cap in force."""
    return int(os.environ.setdefault(KERNEL_CACHE, str(size)))


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        log.info("not glibc: freed memory stays with the C library's allocator")
        return None


def release() -> bool:
    """Hand the free pages of every malloc arena back to the system. True if any went."""
    trim = _malloc_trim()
    return bool(trim and trim(0))
