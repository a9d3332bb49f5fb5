"""What the memory system gives one batch-norm-sized tensor, next to fastbn.

Times, interleaved round-robin (medians) on the same float32 data: a read of x, a
write of y (memset, and with streaming stores), memcpy, a streaming-store copy
(the benchmarks' floor), and fastbn's training forward and backward in both
layouts.  Then fastbn's arithmetic alone: the same calls on a 1/64 slice of the
batch, which stays in cache, times 64.  These are the numbers behind
BENCHMARKS.md ("Why the misses").

    python tools/floors.py [--shape 256x256x14x14] [--threads 1] [--repeat 15]
"""

import argparse
import statistics
import time

import numpy as np

import fastbn
from fastbn import _cpu


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="256x256x14x14", help="N x C x spatial (default %(default)s)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=15)
    opts = p.parse_args()
    shape = tuple(int(v) for v in opts.shape.split("x"))
    nt = opts.threads
    rng = np.random.default_rng(0)
    E = int(np.prod(shape))
    x, dy = (rng.standard_normal(E, dtype=np.float32) for _ in range(2))
    y, dx = np.empty_like(x), np.empty_like(x)
    C = shape[1]
    cl = (shape[0], *shape[2:], C)
    w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    stats = fastbn.RunningStats(C)
    _, ctx_cf = fastbn.forward(x.reshape(shape), w, b)
    _, ctx_cl = fastbn.forward(x.reshape(cl), w, b, axis=-1)
    calls = {
        "read x": lambda: _cpu.parallel_read(x, nt),
        "write y (memset)": lambda: _cpu.parallel_fill(y, nt),
        "write y (streaming)": lambda: _cpu.parallel_fill(y, nt, True),
        "memcpy x -> y": lambda: _cpu.parallel_copy(x, y, nt),
        "streaming copy x -> y (floor)": lambda: _cpu.parallel_copy(x, y, nt, True),
        "training forward NCHW": lambda: fastbn.forward(
            x.reshape(shape), w, b, stats, out=y.reshape(shape), num_threads=nt),
        "training forward NHWC": lambda: fastbn.forward(
            x.reshape(cl), w, b, stats, axis=-1, out=y.reshape(cl), num_threads=nt),
        "backward NCHW": lambda: fastbn.backward(
            dy.reshape(shape), ctx_cf, out=dx.reshape(shape), num_threads=nt),
        "backward NHWC": lambda: fastbn.backward(
            dy.reshape(cl), ctx_cl, out=dx.reshape(cl), num_threads=nt),
    }
    # The arithmetic alone: a 1/64 slice of the batch (in cache), times 64.
    k = 64
    n_small = max(2, shape[0] // k)
    scale = shape[0] / n_small
    sh, sl = (n_small, *shape[1:]), (n_small, *cl[1:])
    m = int(np.prod(sh))
    xs, ys, dys, dxs = x[:m].copy(), y[:m].copy(), dy[:m].copy(), dx[:m].copy()
    _, sctx_cf = fastbn.forward(xs.reshape(sh), w, b)
    _, sctx_cl = fastbn.forward(xs.reshape(sl), w, b, axis=-1)
    small = {
        "in cache x%g: training forward NCHW" % scale: lambda: fastbn.forward(
            xs.reshape(sh), w, b, stats, out=ys.reshape(sh), num_threads=nt),
        "in cache x%g: training forward NHWC" % scale: lambda: fastbn.forward(
            xs.reshape(sl), w, b, stats, axis=-1, out=ys.reshape(sl), num_threads=nt),
        "in cache x%g: inference NCHW" % scale: lambda: fastbn.forward(
            xs.reshape(sh), w, b, stats, training=False, out=ys.reshape(sh), num_threads=nt),
        "in cache x%g: backward NCHW" % scale: lambda: fastbn.backward(
            dys.reshape(sh), sctx_cf, out=dxs.reshape(sh), num_threads=nt),
        "in cache x%g: backward NHWC" % scale: lambda: fastbn.backward(
            dys.reshape(sl), sctx_cl, out=dxs.reshape(sl), num_threads=nt),
    }
    for name, call in small.items():
        calls[name] = (lambda call=call: [call() for _ in range(k)])
    factor = {name: scale / k if name in small else 1.0 for name in calls}
    times = {name: [] for name in calls}
    for call in calls.values():
        call()
    for _ in range(opts.repeat):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    print(f"{opts.shape} float32 ({x.nbytes / 1e6:.1f} MB), {nt} thread(s), "
          f"medians of {opts.repeat}")
    for name, v in times.items():
        print(f"  {name:40s} {statistics.median(v) * factor[name] * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
