"""Parameters, inputs and timed calls shared by the benchmark files.

Every kernel benchmark is parametrised by layout, shape, dtype, threads and backend.
Inputs (random normal data, never zeros) and out= buffers are built in setup, so the
timed call is one fastbn call, plus a device synchronisation on the GPU (otherwise asv
would time only the launch).  Unsupported combinations raise NotImplementedError in
setup, which asv reports as skipped.
"""

import os
import statistics
import time

import numpy as np

import fastbn

LAYOUTS = ["nchw", "nhwc"]
# A tiny tensor (fixed per-call cost) and three beyond the last-level cache share
# (bandwidth): 256 channels, 64 channels (channels-last coefficients and sums held in
# registers) and 2048 channels (channels-last rows of 8 KiB: four quarter-blocks in the
# forward, statistics in 8 row parts).  One of 6.4 MB (float32) that fits the cache
# share but not beside its output and dy: the sizes where the kernels switch between
# their in-cache and their streaming paths.  And a short, wide (N, C) as BatchNorm1d
# sees it: per-channel work, one row chunk, channel tiles at two threads (nhwc_tiled);
# both layouts are the same memory there.
SHAPES = ["16x16x8x8", "64x256x28x28", "128x64x28x28", "64x2048x7x7", "32x256x14x14",
          "16x16384"]
DTYPES = ["float32", "float16"]
THREADS = [1, 2]
BACKENDS = ["cpu", "gpu"]
PARAMS = [LAYOUTS, SHAPES, DTYPES, THREADS, BACKENDS]
PARAM_NAMES = ["layout", "shape", "dtype", "threads", "backend"]


def cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def array_module(backend):
    """numpy for "cpu"; cupy for "gpu" if it imports and sees a device, else skip."""
    if backend == "cpu":
        return np
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device")
    except Exception as exc:          # ImportError, or CUDA runtime errors without a GPU
        raise NotImplementedError(f"gpu backend unavailable: {exc}")
    return cupy


def parse_shape(text):
    return tuple(int(d) for d in text.split("x"))


def normal(rng, shape, dtype):
    """Random normal data (never zeros) of any size in a few milliseconds: a block of 2**20
    draws repeated; the speed of batch norm does not depend on the values' period."""
    size = int(np.prod(shape))
    block = rng.standard_normal(min(size, 1 << 20), dtype=np.float32).astype(dtype)
    return np.resize(block, size).reshape(shape)


class Case:
    """Inputs, parameters, running statistics and output buffers for one parameter set."""

    def __init__(self, layout, shape, dtype, threads, backend):
        if backend == "gpu" and threads != THREADS[0]:
            raise NotImplementedError("the threads parameter applies to the cpu backend")
        if threads > cores():
            raise NotImplementedError(f"{threads} threads on {cores()} cores")
        xp = array_module(backend)
        shape = parse_shape(shape)
        C = shape[1]
        mem = shape if layout == "nchw" else (shape[0], *shape[2:], C)
        dtype = np.dtype(dtype)
        pdtype = np.float64 if dtype == np.float64 else np.float32
        rng = np.random.default_rng(0)
        self.xp = xp
        self.axis = 1 if layout == "nchw" else -1
        self.x = xp.asarray(normal(rng, mem, dtype))
        self.dy = xp.asarray(normal(rng, mem, dtype))
        self.weight = xp.asarray((rng.standard_normal(C) * 0.2 + 1).astype(pdtype))
        self.bias = xp.asarray((rng.standard_normal(C) * 0.2).astype(pdtype))
        like = None if backend == "cpu" else self.x
        self.stats = fastbn.RunningStats(C, dtype=pdtype, like=like)
        self.y = xp.empty_like(self.x)
        self.dx = xp.empty_like(self.x)
        self.threads = threads if backend == "cpu" else None
        self.sync = (lambda: None) if backend == "cpu" else xp.cuda.Device().synchronize
        self.nbytes = self.x.size * dtype.itemsize
        self.ctx = None
        if backend == "gpu":
            try:                      # CuPy is there; is fastbn's GPU backend?
                self.forward(True)
            except (TypeError, NotImplementedError) as exc:
                raise NotImplementedError(f"fastbn gpu backend unavailable: {exc}")

    def forward(self, training):
        _, ctx = fastbn.forward(self.x, self.weight, self.bias, self.stats, training=training,
                                axis=self.axis, out=self.y, num_threads=self.threads)
        self.sync()
        return ctx

    def backward(self):
        fastbn.backward(self.dy, self.ctx, out=self.dx, num_threads=self.threads)
        self.sync()


def bandwidth(call, floor_bytes, min_time=0.05, max_calls=50):
    """Effective bandwidth in GB/s: floor bytes over the median time of a few calls."""
    call()
    times = []
    deadline = time.perf_counter() + min_time
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < max_calls):
        t0 = time.perf_counter_ns()
        call()
        times.append((time.perf_counter_ns() - t0) / 1e9)
    return floor_bytes / statistics.median(times) / 1e9
