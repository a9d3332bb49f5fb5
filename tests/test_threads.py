"""Thread-count handling; results are bit-identical for any thread count."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastbn

from .conftest import make_x

CASES = [
    ((2, 2, 180, 180), 1),     # C below the thread count: (channel, chunk) tasks
    ((40, 2, 15, 30), 1),      # and many samples per chunk: one thread's channel
                               # blocks (samples four at a time) vs tasks
    ((4, 64, 20, 20), 1),      # enough channels: per-channel path
    ((3, 257, 9, 13), 1),      # channel blocks staggered per thread, odd C
    ((3, 1, 250, 250), 1),     # C = 1
    ((50, 20, 20, 37), -1),    # channels-last, many row chunks
    ((4, 9, 9, 700), -1),      # channels-last, two channel blocks
    ((4, 15, 15, 300), -1),    # channels-last: channels 256..295 summed in L1 rows
                               # (one thread) or in registers (a 44-wide tile)
    ((24, 5000), 1),           # wide rows: the threads share the per-channel
                               # coefficients (PAR_CHANNELS)
    ((16, 9000), 1),           # short and wide: every phase by channel tiles at 2-3
                               # threads (nhwc_tiled), a partial last tile
    ((64, 2100), 1),           # one row chunk: every op by channel tiles (nhwc_tiled)
                               # at 1 and 2 threads, float32 not at 3 (8400-byte rows)
    ((40, 2100), 1),           # float32 tiled at 2 threads only (one thread: under
                               # TILED_ONE_BYTES for training)
]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", CASES)
def test_bit_identical_across_thread_counts(rng, shape, axis, dtype):
    x = make_x(rng, shape, dtype, offset=1.5)
    dy = make_x(rng, shape, dtype)
    C = shape[axis]
    pdt = np.float64 if dtype == np.float64 else np.float32
    w = rng.standard_normal(C).astype(pdt)
    b = rng.standard_normal(C).astype(pdt)
    results = []
    for nt in (1, 2, 3):
        stats = fastbn.RunningStats(C, dtype=pdt)
        y, ctx = fastbn.forward(x, w, b, stats, axis=axis, num_threads=nt)
        dx, dw, db = fastbn.backward(dy, ctx, num_threads=nt)
        yi, ctxi = fastbn.forward(x, w, b, stats, axis=axis, training=False, num_threads=nt)
        dxi, dwi, _ = fastbn.backward(dy, ctxi, num_threads=nt)
        results.append((y, stats.mean, stats.var, ctx.mean, ctx.invstd, dx, dw, db, yi, dxi, dwi))
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert a.tobytes() == b_.tobytes()


def test_set_and_get_num_threads():
    default = fastbn.get_num_threads()
    assert default >= 1
    previous = fastbn.set_num_threads(1)
    try:
        assert previous is None
        assert fastbn.get_num_threads() == 1
    finally:
        fastbn.set_num_threads(previous)
    assert fastbn.get_num_threads() == default
    for bad, exc in ((0, ValueError), (-2, ValueError), (1.5, TypeError), ("2", TypeError)):
        with pytest.raises(exc, match="n"):
            fastbn.set_num_threads(bad)
        with pytest.raises(exc, match="num_threads"):
            fastbn.forward(np.ones((2, 2, 2), np.float32), num_threads=bad)


def test_omp_num_threads_is_honoured():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", "import fastbn; print(fastbn.get_num_threads())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_threadpoolctl_limits_are_honoured():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    fastbn.forward(np.ones((2, 2, 2), np.float32) + np.arange(2, dtype=np.float32))
    info = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "openmp"]
    assert info, "threadpoolctl does not see fastbn's OpenMP runtime"
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert fastbn.get_num_threads() == 1
