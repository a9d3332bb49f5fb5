"""fastbn: fast, PyTorch-compatible batch normalization on plain arrays.

    import numpy as np, fastbn
    x = np.random.randn(32, 64, 28, 28).astype(np.float32)
    stats = fastbn.RunningStats(64)
    y, ctx = fastbn.forward(x, stats=stats)          # training forward
    dx, dw, db = fastbn.backward(np.ones_like(y), ctx)

Public names: forward, backward, RunningStats, BatchNorm, get_num_threads,
set_num_threads, precompile.  Importing fastbn imports numpy and nothing else.
"""

from ._api import Context, backward, forward
from ._dispatch import precompile  # GPU kernels up front (imports cupy only when called)
from ._stats import RunningStats
from ._threads import get_num_threads, set_num_threads
from .layers import BatchNorm

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "Context",
    "RunningStats",
    "backward",
    "forward",
    "get_num_threads",
    "precompile",
    "set_num_threads",
]
