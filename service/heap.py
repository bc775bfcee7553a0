"""The heaps: handing freed C memory back to the system (glibc only; a no-op elsewhere),
and keeping the start-up's Python objects out of the cyclic garbage collector.

glibc keeps what Python, numpy and onnxruntime free in its arenas rather than
returning it, so a process that once decoded a large body or opened a large
graph stays that large. Two tools return it: `malloc_trim(0)` hands back the
free pages inside every arena, and pinning the mmap threshold
(`fix_malloc_thresholds`) stops glibc from raising its trim threshold after
each large free. Where they pay off and what they measured:
rest/bodies.py (request bodies) and sessions.py (opening graphs).
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable

from bnfold.service.settings import MIB


def _libc_function(name: str) -> Callable[..., int] | None:
    """A C library function; None where the C library has none (malloc_trim: glibc only)."""
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):
        return None
    return getattr(libc, name, None)


MALLOC_TRIM = _libc_function("malloc_trim")
_MALLOPT = _libc_function("mallopt")
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
GLIBC_MMAP_THRESHOLD_MAX = 32 * MIB


def fix_malloc_thresholds() -> None:
    """Pin glibc's mmap threshold at its maximum so freed arena tops go back (rest/bodies.py).

    Process-wide: call once at start-up. Allocations under 32 MiB come from
    the arenas, as they do anyway once glibc has raised the threshold; only
    the raising of the trim threshold stops. Nothing happens without glibc.
    """
    if MALLOC_TRIM is not None and _MALLOPT is not None:
        _MALLOPT(_M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's `malloc_trim`; nothing
    elsewhere). Opening a session parses and optimises its graph in buffers it then
    frees, and glibc keeps those pages: about 80 MB per ResNet-18 graph."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


def freeze_startup_objects() -> int:
    """Collect once, then move every object the collector tracks to its permanent
    generation, which no collection walks again; the number of objects moved.

    Call once, when start-up (imports, app, model loads) is done. A process
    serving ResNet-18's bench repository tracks about 100,000 objects that live
    as long as it does (modules, classes, routes, schemas, manifests), and each
    full collection walked all of them with the GIL held: 50 ms of CPU, and
    the request in flight waited 66-260 ms on a shared 2-core machine
    (benchmarks/tail_bench.py). Frozen objects are still freed by reference
    counting; only a reference cycle among them is never collected, so the
    collection first frees the cycles start-up left.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
