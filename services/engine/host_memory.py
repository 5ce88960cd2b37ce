"""Keep freed host memory in the process (glibc), so large CPU tensors do not start from fresh pages.

glibc returns every freed block above its mmap threshold (which grows to at most 32 MiB) to
the kernel at once, so the next tensor of that size comes back as new pages, each one a page
fault the kernel must serve and zero. A [256, 49,152] float32 tensor is 12,288 pages: about
13 ms of faults on the development machine, where the operation that fills it (exp, sub)
takes 6 ms. Every step of the CPU engine allocates tensors like that (logits, the
sampler's passes), and page faults are kernel work that a busy machine delays further.
Raising both thresholds keeps freed blocks in the heap for the next step instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("pdserve.engine")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP = 1 << 30  # blocks up to 1 GiB come from (and go back to) the heap


def keep_freed_memory() -> bool:
    """Best effort: True if glibc took the setting (False elsewhere, e.g. musl or macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 * _KEEP))
    except (OSError, AttributeError):
        return False
    log.debug("glibc keeps freed blocks up to %d bytes: %s", _KEEP, ok)
    return ok
