"""Thread-count resolution for the CPU kernels.

Order of precedence, highest first:

1. the ``num_threads=`` argument of a call;
2. :func:`set_num_threads` (process-wide);
3. the OpenMP runtime's own default, ``omp_get_max_threads()``, which already
   honours ``OMP_NUM_THREADS`` and limits set through threadpoolctl
   (``threadpool_limits(n, "openmp")``).

The thread count never changes results: every reduction is merged in a fixed
chunk order, so 1, 2 or 64 threads give the same bits.
"""

import threading

from ._cpu import max_threads as _omp_max_threads

_lock = threading.Lock()
_override = None


def get_num_threads():
    """Number of threads a call without ``num_threads=`` will use."""
    override = _override
    if override is not None:
        return override
    return _omp_max_threads()


def set_num_threads(n):
    """Set the process-wide thread count; ``None`` restores the OpenMP default.

    Returns the previous setting (``None`` if there was none), so that
    ``old = set_num_threads(1); ...; set_num_threads(old)`` restores it.
    """
    global _override
    if n is not None:
        n = _check(n, "n")
    with _lock:
        previous, _override = _override, n
    return previous


def resolve(num_threads):
    """The thread count for one call."""
    if num_threads is None:
        override = _override
        return override if override is not None else _omp_max_threads()
    if type(num_threads) is int and 0 < num_threads <= MAX_THREADS:
        return num_threads
    return _check(num_threads, "num_threads")


MAX_THREADS = 2**31 - 1       # the kernels take a C int


def _check(n, name):
    if isinstance(n, bool) or not isinstance(n, int) and not hasattr(n, "__index__"):
        raise TypeError(f"{name}: expected a positive integer or None, got {type(n).__name__}")
    n = int(n.__index__())
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"{name}: expected a positive integer (at most {MAX_THREADS}) or "
                         f"None, got {n}")
    return n
