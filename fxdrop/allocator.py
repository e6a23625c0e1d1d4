"""Opt-in: keep freed CPU memory in the process, so each step's new gradients reuse resident pages.

With ``optimizer.zero_grad(set_to_none=True)`` (PyTorch's default) every training step allocates new
weight gradients. glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh pages
from the kernel, which faults in and zeroes them on first touch, and unmaps them again on free, so
every step pays for every gradient's pages once more. A dense step hides that behind its GEMMs; an
fxdrop step, whose GEMMs shrink, does not: at h = 4096, p = 0.5 (block) the C++ backward spent about
70 of its 182 ms writing zeros onto fresh pages (torch.profiler; 119 ms with this setting, the dense
step 434 vs 426 ms). This is the reason CPU training guides recommend jemalloc or tcmalloc. (fxdrop's
C++ kernels now advise transparent huge pages for those buffers, which brought the step to ~140 ms
without this setting.)

:func:`retain_freed_memory` sets glibc's ``M_MMAP_MAX = 0`` (big blocks come from the heap) and a large
``M_TRIM_THRESHOLD`` (freed blocks stay there). It is process-wide and never undone, so fxdrop never
calls it on its own: the benchmarks say when they ran with it. Imports the standard library only.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_MAX = -4
_state = {"retained": False}


def retain_freed_memory() -> bool:
    """Keep freed memory for reuse (glibc on Linux); returns whether the setting took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    _state["retained"] = _state["retained"] or ok
    return ok


def retained() -> bool:
    """Whether :func:`retain_freed_memory` took effect in this process."""
    return _state["retained"]
